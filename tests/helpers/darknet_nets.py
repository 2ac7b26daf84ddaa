"""darknet cfgs written for the tests: the layer sequences of well-known networks,
generated here (the real files stay in pjreddie's repository)."""

from __future__ import annotations


def conv(filters: int, size: int, stride: int = 1, *, bn: bool = True) -> str:
    """A ``[convolutional]`` section: leaky with batch_normalize, else linear."""
    lines = ["[convolutional]"]
    lines += ["batch_normalize=1"] if bn else []
    lines += [f"filters={filters}", f"size={size}", f"stride={stride}", "pad=1"]
    lines.append(f"activation={'leaky' if bn else 'linear'}")
    return "\n".join(lines) + "\n"


def yolo(mask: str, classes: int = 80) -> str:
    anchors = "10,14,23,27,37,58,81,82,135,169,344,319"
    return f"[yolo]\nmask={mask}\nanchors={anchors}\nclasses={classes}\nnum=6\n"


def yolov3_tiny(size: int = 416) -> str:
    """yolov3-tiny's layer sequence (24 layers, 80 classes) at ``size``²."""
    out = [f"[net]\nbatch=1\nwidth={size}\nheight={size}\nchannels=3\n"]
    for filters in (16, 32, 64, 128, 256):
        out += [conv(filters, 3), "[maxpool]\nsize=2\nstride=2\n"]
    out += [conv(512, 3), "[maxpool]\nsize=2\nstride=1\n", conv(1024, 3)]
    out += [conv(256, 1), conv(512, 3), conv(255, 1, bn=False), yolo("3,4,5")]
    out += ["[route]\nlayers=-4\n", conv(128, 1), "[upsample]\nstride=2\n"]
    out += ["[route]\nlayers=-1,8\n", conv(256, 3), conv(255, 1, bn=False)]
    out.append(yolo("0,1,2"))
    return "\n".join(out)
