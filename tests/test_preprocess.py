"""Image loading and preprocessing, checked against transformers' SiglipImageProcessor."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from data import load_image, preprocess_image


def photo_like(width, height, seed=0):
    """A smooth colour gradient with blurred shapes and sensor-like noise, passed through JPEG: the kind of
    content (soft edges, fine texture, compression artefacts) the resize meets in COCO photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([200 * x + 30, 150 * y + 50, 120 * (1 - x) + 60], axis=-1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        size = int(rng.integers(5, max(width, height) // 3))
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=85)
    return Image.open(io.BytesIO(encoded.getvalue()))


def with_transparency(width, height):
    image = photo_like(width, height, seed=1).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))  # fades to fully transparent
    image.putalpha(Image.fromarray(alpha))
    return image


IMAGES = {
    "landscape photo (downscale)": lambda: photo_like(640, 427),
    "portrait photo": lambda: photo_like(375, 500, seed=2),
    "small photo (upscale)": lambda: photo_like(90, 61, seed=3),
    "RGBA with a transparency gradient": lambda: with_transparency(300, 200),
    "grayscale": lambda: photo_like(320, 240, seed=4).convert("L"),
    "palette": lambda: photo_like(256, 256, seed=5).convert("P"),
    "pure noise": lambda: Image.fromarray(np.random.default_rng(6).integers(0, 256, (231, 517, 3), dtype=np.uint8)),
}


@pytest.fixture(scope="module")
def siglip_processor():
    # The PIL backend of transformers' SigLIP processor (what `SiglipImageProcessor` falls back to when
    # torchvision is absent, and what it was before transformers 5); named directly so the reference does not
    # change with whether torchvision happens to be installed.
    from transformers.image_utils import PILImageResampling
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=PILImageResampling.BICUBIC,
                                   do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("name", IMAGES)
def test_matches_siglip_image_processor(siglip_processor, name):
    image = IMAGES[name]()
    expected = torch.from_numpy(siglip_processor(image, return_tensors="np")["pixel_values"][0])
    ours = preprocess_image(image, image_size=224)
    assert ours.shape == expected.shape == (3, 224, 224) and ours.dtype == torch.float32
    # Both resize the uint8 image with PIL's bicubic filter, then scale and normalise in float32, so they agree
    # to float rounding (measured: exactly). A float-domain resize (e.g. torchvision's) would differ by ~1e-2.
    max_diff = (ours - expected).abs().max().item()
    assert max_diff <= 1e-6, f"{name}: max abs diff {max_diff}"


def test_pixels_land_in_minus_one_to_one():
    black_and_white = Image.new("RGB", (40, 30), (0, 0, 0))
    black_and_white.paste((255, 255, 255), (20, 0, 40, 30))
    pixels = preprocess_image(black_and_white, image_size=64)
    assert pixels.shape == (3, 64, 64)
    assert pixels[:, :, :28].eq(-1).all() and pixels[:, :, 36:].eq(1).all()  # away from the resized edge


def test_transparent_pixels_become_white_not_their_stored_colour():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent, stores red
    assert preprocess_image(image, image_size=8).eq(1).all()


def test_load_image_from_bytes_path_and_pil(tmp_path):
    image = photo_like(50, 40)
    image.save(tmp_path / "a.png")
    encoded = (tmp_path / "a.png").read_bytes()
    for source in (encoded, str(tmp_path / "a.png"), tmp_path / "a.png", image.convert("L")):
        loaded = load_image(source, "a.png")
        assert loaded.mode == "RGB" and loaded.size == (50, 40)
    assert np.array_equal(np.asarray(load_image(encoded, "a.png")), np.asarray(image.convert("RGB")))


def test_unreadable_images_raise_an_error_naming_them(tmp_path):
    with pytest.raises(ValueError, match="shard-3.parquet row 17"):
        load_image(b"\x89PNG but not really", "shard-3.parquet row 17")
    with pytest.raises(ValueError, match="images/missing.jpg"):
        load_image(str(tmp_path / "images/missing.jpg"), "images/missing.jpg")
    encoded = io.BytesIO()
    photo_like(200, 200).save(encoded, format="JPEG")
    with pytest.raises(ValueError, match="cut.jpg"):  # a download cut short: only decoding finds out
        load_image(encoded.getvalue()[: len(encoded.getvalue()) // 2], "cut.jpg")
