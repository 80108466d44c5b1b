"""The project's identity: shown by `--version` and stored in every checkpoint."""

NAME = "srcnn"
VERSION = "0.1.0"
DESCRIPTION = ("SRCNN single-image super-resolution in PyTorch, models shipped for x2, x3 and x4: "
               "train, evaluate, super-resolve.")
CITATION = (
    "C. Dong, C. C. Loy, K. He, X. Tang. Image Super-Resolution Using Deep Convolutional Networks. "
    "IEEE TPAMI 38(2):295-307, 2016 (ECCV 2014: Learning a Deep Convolutional Network for "
    "Image Super-Resolution)."
)


def version_string() -> str:
    return f"{NAME} {VERSION}: {DESCRIPTION}\nCite: {CITATION}"
