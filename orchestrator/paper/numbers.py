"""The paper's numbers as data (He et al. 2016, Tables 1-6); orchestrator.paper.comparison puts
them beside a run's in tables and metrics, and the tests check the model zoo against Table 1.

Errors are in percent, as the paper prints them. Protocols: "ten_crop" (Tables 2-3),
"multiscale" (Table 4, fully convolutional over scales {224,...,640} with flips), "center"
(the authors' single 224 centre crop of the shorter-side-256 image), "ensemble" (Table 5, test
set), "cifar_test" (Table 6, single original view).
"""

from __future__ import annotations

from dataclasses import dataclass

# Table 1: parameters of the option-B ImageNet nets, exactly as torchvision counts them (the
# paper prints no counts for these; torchvision's nets have the same parameter shapes), and
# multiply-adds in units of 1e9 as the paper prints them ("FLOPs").
IMAGENET_PARAMS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}
IMAGENET_MACS_G = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
# Table 6: parameters of the CIFAR-10 ResNets, in millions, rounded as the paper prints them.
CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@dataclass(frozen=True)
class PaperResult:
    source: str  # "Table 3", ...
    model: str  # a registered model name
    protocol: str
    top1: float | None
    top5: float | None
    shortcut: str | None = None  # ResNet-34's option A/B/C in Tables 3-4
    note: str = ""


RESULTS: tuple[PaperResult, ...] = (
    PaperResult("Table 2", "plain18", "ten_crop", 27.94, None),
    PaperResult("Table 2", "plain34", "ten_crop", 28.54, 10.02, note="Table 3 gives top-5"),
    PaperResult("Table 2", "resnet18", "ten_crop", 27.88, None),
    PaperResult("Table 3", "resnet34", "ten_crop", 25.03, 7.76, shortcut="A"),
    PaperResult("Table 3", "resnet34", "ten_crop", 24.52, 7.46, shortcut="B"),
    PaperResult("Table 3", "resnet34", "ten_crop", 24.19, 7.40, shortcut="C"),
    PaperResult("Table 3", "resnet50", "ten_crop", 22.85, 6.71),
    PaperResult("Table 3", "resnet101", "ten_crop", 21.75, 6.05),
    PaperResult("Table 3", "resnet152", "ten_crop", 21.43, 5.71),
    PaperResult("Table 4", "resnet34", "multiscale", 21.84, 5.71, shortcut="B"),
    PaperResult("Table 4", "resnet34", "multiscale", 21.53, 5.60, shortcut="C"),
    PaperResult("Table 4", "resnet50", "multiscale", 20.74, 5.25),
    PaperResult("Table 4", "resnet101", "multiscale", 19.87, 4.60),
    PaperResult("Table 4", "resnet152", "multiscale", 19.38, 4.49),
    PaperResult("Table 5", "ensemble", "ensemble", None, 3.57, note="test set, ILSVRC 2015 winner"),
    PaperResult("authors' models", "resnet50", "center", 24.7, 7.8),
    PaperResult("authors' models", "resnet101", "center", 23.6, 7.1),
    PaperResult("authors' models", "resnet152", "center", 23.0, 6.7),
    PaperResult("Table 6", "cifar_resnet20", "cifar_test", 8.75, None),
    PaperResult("Table 6", "cifar_resnet32", "cifar_test", 7.51, None),
    PaperResult("Table 6", "cifar_resnet44", "cifar_test", 7.17, None),
    PaperResult("Table 6", "cifar_resnet56", "cifar_test", 6.97, None),
    PaperResult(
        "Table 6", "cifar_resnet110", "cifar_test", 6.43, None, note="best of 5; mean 6.61 +- 0.16"
    ),
    PaperResult("Table 6", "cifar_resnet1202", "cifar_test", 7.93, None),
)


def lookup(
    model: str, protocol: str, shortcut: str | None = None, num_classes: int | None = None
) -> PaperResult | None:
    """The paper's number for a model under a protocol (ResNet-34 defaults to option B).
    `num_classes`: the evaluated dataset's; the paper's numbers are for ImageNet's 1000
    classes and CIFAR-10's 10, so another count (the demo's 10 generated classes under an
    ImageNet net) has nothing to compare with: None."""
    if protocol == "center" and model.startswith("cifar_"):
        protocol = "cifar_test"  # CIFAR's test protocol is the single original view
    if num_classes is not None and num_classes != (10 if protocol == "cifar_test" else 1000):
        return None
    matches = [r for r in RESULTS if r.model == model and r.protocol == protocol]
    if len(matches) > 1:
        matches = [r for r in matches if r.shortcut == (shortcut or "B")]
    return matches[0] if matches else None
