import io

import keras
import numpy as np
import pytest
from PIL import Image

from lungxray.data.images import ImageError, read_image


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.fixture
def gradient():
    row = np.linspace(0, 255, 50).astype(np.uint8)
    return np.tile(row, (30, 1))  # 30 x 50, left dark, right bright


def test_matches_keras_load_img_nearest(tmp_path, gradient):
    """The reference's inputs: keras load_img(rgb, nearest) then img_to_array, float [0, 255]."""
    rgb = np.stack([gradient, gradient[::-1], 255 - gradient], axis=-1)
    for name, image in {"gray.png": Image.fromarray(gradient), "rgb.png": Image.fromarray(rgb)}.items():
        path = save(image, tmp_path / name)
        reference = keras.utils.img_to_array(keras.utils.load_img(path, color_mode="rgb", target_size=(24, 24),
                                                                  interpolation="nearest"))
        ours = read_image(path, 24, "nearest")
        assert ours.dtype == np.uint8 and ours.shape == (24, 24, 3)
        np.testing.assert_array_equal(ours.astype(np.float32), reference)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_modes_become_rgb(tmp_path, gradient, mode):
    image = Image.fromarray(gradient).convert(mode)
    out = read_image(save(image, tmp_path / "x.png"))
    assert out.shape == (30, 50, 3)
    # A grey gradient stays a grey gradient: channels equal, dark left, bright right.
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=2)
    assert out[:, 0].mean() < 20 and out[:, -1].mean() > 235


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_image(path)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert 120 < out[4, 0, 0] < 135  # the middle value lands mid-range; clipping would give 255


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (20, 20), (0, 0, 0, 0))  # no ink: white
    out = read_image(save(image, tmp_path / "cmyk.jpg", quality=95))
    assert out.shape == (20, 20, 3) and out.mean() > 240


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 30), np.uint8)
    array[:, :5] = 255  # bright band on the left of a wide image
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=100)
    out = read_image(path)
    assert out.shape[:2] == (30, 10)  # displayed upright: tall
    assert out[:5, :, 0].mean() > 200  # the band is now on top


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not a recognised image format"),
])
def test_unreadable_files_name_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as caught:
        read_image(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_truncated_jpeg(tmp_path, gradient):
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_image(path)


def test_png_with_wrong_extension_is_read(tmp_path, gradient):
    path = save(Image.fromarray(gradient), tmp_path / "actually_png.jpg", format="PNG")
    assert read_image(path).shape == (30, 50, 3)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import lungxray.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    path = save(Image.new("L", (100, 100)), tmp_path / "big.png")
    with pytest.raises(ImageError, match="too large"):
        read_image(path)
