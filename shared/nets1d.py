"""The two 1-D convolutional reference models of the PTB-XL benchmark, in plain PyTorch.

Strodthoff, Wagner, Schaeffter, Samek (2020), "Deep Learning for ECG Analysis: Benchmarks and
Insights from PTB-XL". Their code (helme/ecg_ptbxl_benchmarking) builds these models on fastai;
this file rebuilds the same architectures, with the same layer shapes and therefore the same
parameter counts, without that dependency, so that later stages (training, export, pruning,
quantization) work on ordinary torch modules.

- resnet1d_wang: the shallow, wide ResNet of Wang et al. (2017) as configured in the benchmark.
- xresnet1d101: fastai's "bag of tricks" xresnet, in 1-D and with the benchmark's constant block
  width of 64 (expansion 4), which is why a 101-layer net has only ~1.9 M parameters.

Both take (batch, leads, time) float input of any length and return (batch, num_classes) logits.
Every forward is a fixed sequence of modules (no data-dependent Python branching), so the models
go through torch.export, torch.nn.utils.prune and torch.ao.quantization.quantize_dynamic as-is.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# The shared head


class ConcatPool1d(nn.Module):
    """Max and average over time, concatenated: the benchmark's pooling, which makes the head
    independent of the record length and sees both peak-like and level-like evidence."""

    def __init__(self):
        super().__init__()
        self.max = nn.AdaptiveMaxPool1d(1)
        self.avg = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        # order [max, avg] as in the benchmark, so that its weights would map one to one
        return torch.cat([self.max(x), self.avg(x)], dim=1).flatten(1)


def concat_pool_head(nf, num_classes, lin_ftrs=(128,), ps=0.5, bn_final=False):
    """The benchmark's `create_head1d`: concat pooling, then BatchNorm -> Dropout -> Linear (-> ReLU)
    for each hidden size in `lin_ftrs`, then one more for the classes. As in fastai, the last
    dropout gets `ps` and the earlier ones `ps / 2`."""
    sizes = [2 * nf, *lin_ftrs, num_classes]
    drops = [ps / 2] * (len(sizes) - 2) + [ps]
    layers = [ConcatPool1d()]
    for i, (ni, no, p) in enumerate(zip(sizes[:-1], sizes[1:], drops)):
        layers += [nn.BatchNorm1d(ni)]
        if p > 0:
            layers += [nn.Dropout(p)]
        layers += [nn.Linear(ni, no)]
        if i < len(sizes) - 2:
            layers += [nn.ReLU(inplace=True)]
    if bn_final:
        layers += [nn.BatchNorm1d(num_classes, momentum=0.01)]
    return nn.Sequential(*layers)


def conv1d(ni, nf, ks, stride=1):
    """'Same'-style padding (exact for odd kernels), no bias because a BatchNorm always follows."""
    return nn.Conv1d(ni, nf, kernel_size=ks, stride=stride, padding=(ks - 1) // 2, bias=False)


# ------------------------------------------------------------------------------------------------
# resnet1d_wang


class BasicBlock1d(nn.Module):
    """Two convolutions and a skip: the torchvision BasicBlock in 1-D, with the first kernel
    longer than the second (5 then 3 in the benchmark)."""

    def __init__(self, ni, nf, stride=1, kernel_size=(5, 3)):
        super().__init__()
        self.conv1 = conv1d(ni, nf, kernel_size[0], stride)
        self.bn1 = nn.BatchNorm1d(nf)
        self.conv2 = conv1d(nf, nf, kernel_size[1])
        self.bn2 = nn.BatchNorm1d(nf)
        self.relu = nn.ReLU(inplace=True)
        # a 1x1 strided projection only where the skip would otherwise not match in shape
        self.downsample = nn.Identity()
        if stride != 1 or ni != nf:
            self.downsample = nn.Sequential(
                nn.Conv1d(ni, nf, kernel_size=1, stride=stride, bias=False), nn.BatchNorm1d(nf)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet1dWang(nn.Module):
    """Stem convolution, a few BasicBlocks of constant width, concat-pool head.

    The benchmark's `resnet1d_wang` = its generic `ResNet1d` with layers [1, 1, 1], width 128,
    kernels [5, 3], stem kernel 7 (Wang et al. used 8; the benchmark notes the change, an odd
    kernel keeps the length exact), stem stride 1 and no stem max-pool. The generic class keeps its
    default stride 2 for every stage after the first, so blocks 2 and 3 each halve the time axis
    through a 1x1 projection skip; `stride=1` gives the unstrided variant.
    """

    def __init__(self, num_classes=5, in_channels=12, layers=(1, 1, 1), width=128,
                 kernel_size=(5, 3), kernel_size_stem=7, stride=2,
                 lin_ftrs=(128,), ps=0.5, bn_final=False):
        super().__init__()
        if isinstance(kernel_size, int):  # the benchmark's rule: k -> [k, k // 2 + 1]
            kernel_size = (kernel_size, kernel_size // 2 + 1)
        self.stem = nn.Sequential(
            conv1d(in_channels, width, kernel_size_stem), nn.BatchNorm1d(width), nn.ReLU(inplace=True)
        )
        blocks = []
        for i, n in enumerate(layers):
            for j in range(n):
                s = stride if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock1d(width, width, s, kernel_size))
        self.blocks = nn.Sequential(*blocks)
        self.head = concat_pool_head(width, num_classes, lin_ftrs, ps, bn_final)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def resnet1d_wang(num_classes=5, in_channels=12, **kw):
    """The benchmark's resnet1d_wang (~0.47 M parameters for 5 classes)."""
    return ResNet1dWang(num_classes=num_classes, in_channels=in_channels, **kw)


# ------------------------------------------------------------------------------------------------
# xresnet1d


def conv_bn(ni, nf, ks, stride=1, act=True, zero_bn=False):
    """fastai's ConvLayer: conv -> BatchNorm (-> ReLU). `zero_bn` starts the BN scale at 0, so a
    residual branch ending in it is the identity at initialisation (the "bag of tricks" init)."""
    bn = nn.BatchNorm1d(nf)
    nn.init.constant_(bn.weight, 0.0 if zero_bn else 1.0)
    layers = [conv1d(ni, nf, ks, stride), bn]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HalvingAvgPool1d(nn.Module):
    """Average pairs of time steps, keeping a lone last step as is: fastai's
    AvgPool1d(2, ceil_mode=True), output length ceil(T / 2) like the strided conv path. Written as
    an edge pad + floor-mode pool because torch.export cannot prove the ceil_mode output length
    equals the conv's for a symbolic T and would pin T to the example's length."""

    def forward(self, x):
        return F.avg_pool1d(F.pad(x, (0, 1), mode="replicate"), kernel_size=2, stride=2)


class StemMaxPool1d(nn.Module):
    """nn.MaxPool1d(3, stride=2, padding=1) computed as a 2-D pool over a dummy height axis:
    identical output, but torch.export's max_pool1d pins the time length to the example's while
    max_pool2d keeps it symbolic."""

    def forward(self, x):
        return F.max_pool2d(x.unsqueeze(2), (1, 3), (1, 2), (0, 1)).squeeze(2)


class ResBlock(nn.Module):
    """xresnet block. Expansion 1: two k-convs; expansion 4: 1x1 -> k (strided) -> 1x1 bottleneck.
    The skip average-pools before its 1x1 projection instead of using a strided 1x1 conv, so no
    input sample is simply dropped (ResNet-D)."""

    def __init__(self, expansion, ni, nh, stride=1, kernel_size=5):
        super().__init__()
        ni, nf = ni * expansion, nh * expansion
        if expansion == 1:
            convs = [conv_bn(ni, nh, kernel_size, stride),
                     conv_bn(nh, nf, kernel_size, act=False, zero_bn=True)]
        else:
            convs = [conv_bn(ni, nh, 1),
                     conv_bn(nh, nh, kernel_size, stride),
                     conv_bn(nh, nf, 1, act=False, zero_bn=True)]
        self.convs = nn.Sequential(*convs)
        idpath = []
        if stride != 1:
            idpath.append(HalvingAvgPool1d())
        if ni != nf:
            idpath.append(conv_bn(ni, nf, 1, act=False))
        self.idpath = nn.Sequential(*idpath)  # empty Sequential is the identity
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.convs(x) + self.idpath(x))


class XResNet1d(nn.Module):
    """Three-conv stem (stride 2 on the first) + max-pool, stages of ResBlocks, concat-pool head.

    Unlike fastai's image xresnet (widths 64, 128, 256, 512), the benchmark keeps every stage at
    width 64 (x expansion): time resolution still halves per stage, the channel count does not
    grow. `width_mult` scales those widths and `layers` sets the depth, for smaller variants.
    """

    def __init__(self, layers=(3, 4, 23, 3), expansion=4, num_classes=5, in_channels=12,
                 width_mult=1.0, stem_sizes=(32, 32, 64), kernel_size=5, kernel_size_stem=5,
                 lin_ftrs=(128,), ps=0.5, bn_final=False):
        super().__init__()
        sizes = [in_channels, *stem_sizes]
        self.stem = nn.Sequential(
            *[conv_bn(sizes[i], sizes[i + 1], kernel_size_stem, stride=2 if i == 0 else 1)
              for i in range(3)],
            StemMaxPool1d(),
        )
        # stages 5+ (the benchmark's "_deep" variants) use half width
        widths = [int(w * width_mult) for w in [64] * min(len(layers), 4) + [32] * (len(layers) - 4)]
        # the first block sees the stem's output: stem_sizes[-1] channels = ni * expansion
        assert stem_sizes[-1] % expansion == 0, "stem width must be divisible by expansion"
        widths = [stem_sizes[-1] // expansion] + widths
        stages = []
        for i, n in enumerate(layers):
            blocks = [ResBlock(expansion, widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                               stride=(1 if i == 0 else 2) if j == 0 else 1, kernel_size=kernel_size)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = concat_pool_head(widths[-1] * expansion, num_classes, lin_ftrs, ps, bn_final)
        self._init()

    def _init(self):
        """fastai's init_cnn: Kaiming-normal conv/linear weights, zero biases. BN scales keep what
        conv_bn set (1, or 0 for the last BN of each residual branch)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def xresnet1d(layers=(3, 4, 23, 3), expansion=4, num_classes=5, in_channels=12, **kw):
    """Any xresnet1d depth/width; the named constructors below fix `layers` and `expansion`."""
    return XResNet1d(layers=layers, expansion=expansion, num_classes=num_classes,
                     in_channels=in_channels, **kw)


def xresnet1d101(num_classes=5, in_channels=12, **kw):
    """The benchmark's xresnet1d101: expansion 4, layers [3, 4, 23, 3] (~1.87 M parameters)."""
    return xresnet1d((3, 4, 23, 3), 4, num_classes, in_channels, **kw)


def xresnet1d50(num_classes=5, in_channels=12, **kw):
    """Expansion 4, layers [3, 4, 6, 3]: the same net with 6 instead of 23 blocks in stage 3."""
    return xresnet1d((3, 4, 6, 3), 4, num_classes, in_channels, **kw)


def xresnet1d_small(num_classes=5, in_channels=12, **kw):
    """One block per stage (expansion 4, ~0.3 M parameters): a quick CPU stand-in for xresnet1d101
    with the same stem, block type, downsampling schedule and head."""
    return xresnet1d((1, 1, 1, 1), 4, num_classes, in_channels, **kw)


NETS1D = {
    "resnet1d_wang": resnet1d_wang,
    "xresnet1d101": xresnet1d101,
    "xresnet1d50": xresnet1d50,
    "xresnet1d_small": xresnet1d_small,
}
