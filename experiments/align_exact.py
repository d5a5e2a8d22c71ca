"""Which networks pdiff can align, and how exactly: for each torchvision classifier the symmetry spec accepts (at
random initialisation, 32 px inputs, 10 classes), a copy with every group of hidden units shuffled (parameters and
running statistics) computes the same outputs and aligns back to the network bit for bit; the ones it refuses,
with the node it names. Prints a Markdown table (test_pdiff.py runs the same checks on smaller versions).

    python experiments/align_exact.py [ARCH ...]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pdiff  # noqa: E402

ACCEPTED = ["resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "mnasnet0_5", "vgg11_bn", "alexnet"]
REFUSED = ["resnext50_32x4d", "regnet_x_400mf", "densenet121", "squeezenet1_1", "shufflenet_v2_x0_5", "googlenet",
           "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t"]


def check(arch: str) -> str:
    torch.manual_seed(0)
    net, ch, size = pdiff.build_net(arch, 3, 32, 10)
    net.eval()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():  # statistics away from their initial values, so a forgotten one would show
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=g), m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g), m.bias.data.normal_(0, 0.1, generator=g)
    t = time.perf_counter()
    try:
        spec = pdiff.symmetry(net, (ch, size, size))
    except pdiff.PdiffError as e:
        return f"| {arch} | refused: {str(e).split(': ', 1)[1].split(';')[0]} | | | | |"
    t_spec = time.perf_counter() - t
    layout, ref = pdiff.select_params(net, "all"), dict(net.state_dict())
    shuffled = pdiff.permuted(ref, spec, [torch.randperm(u.n, generator=g) for u in spec])
    x = torch.randn(4, ch, size, size, generator=g)
    with torch.no_grad():
        y, y_shuffled = (torch.func.functional_call(net, p, (x,)) for p in (ref, shuffled))
    t = time.perf_counter()
    back = pdiff.align_to(layout.pack(shuffled)[None], layout.pack(ref), layout, spec)[0]
    t_align = time.perf_counter() - t
    return (f"| {arch} | {layout.D:,} | {len(spec)} groups, {sum(u.n for u in spec):,} units ({t_spec:.1f} s) | "
            f"{(y_shuffled - y).abs().max() / y.abs().max():.1e} | {torch.equal(back, layout.pack(ref))} | "
            f"{t_align:.1f} |")


if __name__ == "__main__":
    print("| network | parameters | symmetry spec | outputs of the shuffled copy (max rel. diff) | aligned back "
          "bit for bit | seconds |")
    print("|---|---|---|---|---|---|")
    for arch in sys.argv[1:] or ACCEPTED + REFUSED:
        print(check(arch), flush=True)
