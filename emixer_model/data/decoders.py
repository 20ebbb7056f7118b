"""A grey image's stored pixel values: pydicom's decoder plugins first, GDCM as the fallback.

Real archives hold slightly non-conformant streams, and pydicom's plugins are strict. pydicom's
own sample `JPEG-lossy.dcm` is one: a 12-bit JPEG Extended stream whose scan header ends its
spectral selection at 0 instead of 63, so libjpeg stops ("A misplaced marker segment was found")
and Pillow refuses 12-bit. GDCM (python-gdcm) reads it. pydicom has a GDCM plugin too, but that
one refuses 12-bit JPEG Extended outright and, once installed, runs first for every syntax. So
the order is named here: pydicom's plugins as pydicom lists them (less its GDCM plugin), then
GDCM reading the whole file. The name of the decoder that succeeded goes back to the caller, so
`emixer data check` can say which one read each transfer syntax.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

try:
    import gdcm
except ImportError:  # python-gdcm has wheels for the common platforms only
    gdcm = None

log = logging.getLogger("emixer.data.decoders")

# pydicom's plugins in the order pydicom itself tries them for each syntax, its GDCM plugin left out
PYDICOM_PLUGINS = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")
# The compressed syntaxes GDCM decodes (its JPEG codecs take 8, 12 and 16-bit streams)
GDCM_SYNTAXES: frozenset[UID] = frozenset(
    ()
    if gdcm is None
    else (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, JPEG2000Lossless, JPEG2000, RLELossless)
)
# how pydicom's error starts when the one plugin it was given failed (the plugin's message follows)
PYDICOM_FAILED = "Unable to decode as exceptions were raised by all available plugins:"
UNCOMPRESSED = "pydicom"  # the name reported for pixel data that needs no decompression


def has_decoder(syntax: UID) -> bool:
    """Whether any installed decoder handles this compressed transfer syntax."""
    return syntax in GDCM_SYNTAXES or bool(_plugins(syntax))


def decode_pixels(ds: Dataset, syntax: UID | None, path: Path) -> tuple[np.ndarray, str]:
    """(stored pixel values, decoder name) of `ds`, whose file is `path`; raises RuntimeError
    naming every decoder's failure when none can read it."""
    if syntax is None or not syntax.is_compressed:
        return ds.pixel_array, UNCOMPRESSED
    failures = []
    for name in _plugins(syntax):
        try:
            return pixel_array(ds, decoding_plugin=name), name
        except Exception as err:  # a strict plugin refused the stream: try the next one
            said = " ".join(str(err).split()).removeprefix(f"{PYDICOM_FAILED} {name}: ")
            failures.append(f"{name}: {said}")
    if syntax in GDCM_SYNTAXES:
        try:
            return gdcm_pixels(path), "gdcm"
        except RuntimeError as err:
            failures.append(f"gdcm: {err}")
    raise RuntimeError(f"Unable to decode: {'; '.join(failures) or 'no decoder'}")


def _plugins(syntax: UID) -> tuple[str, ...]:
    """pydicom's installed plugins for `syntax`, in PYDICOM_PLUGINS order."""
    try:
        available = get_decoder(syntax).available_plugins
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        return ()
    return tuple(name for name in PYDICOM_PLUGINS if name in available)


def gdcm_pixels(path: Path) -> np.ndarray:
    """The stored values of a single-frame grey image as GDCM reads the whole file."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    with _stderr_captured() as messages:
        image = reader.GetImage() if reader.Read() else None
        buffer = image.GetBuffer() if image is not None else None  # None: decoding failed
    said = "; ".join(dict.fromkeys(messages))  # its codecs repeat themselves
    if said:
        log.debug("%s: gdcm: %s", path, said)
    if buffer is None:
        said = said or "no reason given"
        verb = "read" if image is None else "decode"
        raise RuntimeError(f"cannot {verb} the pixel data ({said})")
    data = buffer.encode("utf-8", "surrogateescape")  # GDCM returns char* as str
    fmt = image.GetPixelFormat()
    columns, rows = image.GetDimension(0), image.GetDimension(1)
    dtype = np.dtype(f"={'i' if fmt.GetPixelRepresentation() else 'u'}{fmt.GetPixelSize()}")
    if fmt.GetSamplesPerPixel() != 1 or len(data) != rows * columns * dtype.itemsize:
        raise RuntimeError(f"{len(data)} bytes of pixel data for a {rows} x {columns} grey image")
    return np.frombuffer(data, dtype=dtype).reshape(rows, columns)


_STDERR = threading.Lock()


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """GDCM's JPEG codecs print their complaints straight to file descriptor 2 (gdcm.Trace does
    not silence them), which would put C library chatter among the CLI's output. Point fd 2 at a
    temporary file meanwhile and yield the list its lines land in when the block ends."""
    lines: list[str] = []
    with _STDERR, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())
