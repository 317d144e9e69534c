"""Capture one frame from the Raspberry Pi camera with picamera2.

picamera2 is not on PyPI for the Pi's libcamera stack: Raspberry Pi OS ships it as the apt
package `python3-picamera2`. A virtual environment sees it only when created with
`python3 -m venv --system-site-packages`. Everywhere else `capture_frame` raises
CameraUnavailable with that advice instead of an ImportError.
"""

from __future__ import annotations

import time

import numpy as np

INSTALL_HINT = (
    "On Raspberry Pi OS: sudo apt install python3-picamera2, and create the virtual "
    "environment with `python3 -m venv --system-site-packages` so that it can import it "
    "(picamera2 needs the system's libcamera; it is not pip-installable)."
)


class CameraUnavailable(RuntimeError):
    """No picamera2 here, or no camera answered. The message says which and what to do."""


def capture_frame(size: tuple[int, int] = (1280, 960), settle_s: float = 1.0) -> np.ndarray:
    """One still from the first camera: uint8 [H, W, 3], RGB order.

    `size` is (width, height); `settle_s` lets auto exposure and white balance converge.
    """
    try:
        from picamera2 import Picamera2  # heavy, Pi-only: imported when asked for
    except ImportError as err:
        raise CameraUnavailable(f"--camera needs picamera2, which is not installed here ({err}). {INSTALL_HINT}") from err
    try:
        camera = Picamera2()
    except Exception as err:  # noqa: BLE001 - picamera2 raises IndexError/RuntimeError
        raise CameraUnavailable(
            f"no camera found by picamera2 ({type(err).__name__}: {err}). Is it connected and "
            f"enabled (rpicam-hello --list-cameras)?"
        ) from err
    try:
        camera.configure(camera.create_still_configuration(main={"size": size, "format": "RGB888"}))
        camera.start()
        time.sleep(settle_s)
        frame = np.asarray(camera.capture_array("main"))
    except Exception as err:  # noqa: BLE001
        raise CameraUnavailable(f"camera capture failed ({type(err).__name__}: {err})") from err
    finally:
        try:
            camera.close()
        except Exception:  # noqa: BLE001 - closing a half-opened camera can fail too
            pass
    if frame.ndim != 3 or frame.shape[2] < 3:
        raise CameraUnavailable(f"camera returned an unexpected frame of shape {list(frame.shape)}")
    # libcamera's "RGB888" is stored B, G, R per pixel: reverse into RGB.
    return np.ascontiguousarray(frame[:, :, 2::-1])
