"""Slides and images beyond PIL's limit, read by region (slides.py), and the window stream they go through (tiling.py).

    python -m pytest tests/test_slides.py -q

Without a model where the model is not the point: the region path must give the model exactly the inputs today's path
gives it for the same pixels, and the merge the same boxes; a fake `run` stands in for the model there.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import files
import slides
from conftest import assert_one_line_error
from files import ImageFiles, drawable, find_images, open_image
from slides import (ArraySource, Level, OpenSlideSource, Plan, cell_width, choose_level, overview, plan_source,
                    window_inputs)
from tiling import BCCD_FIELD, Reading, in_batches, local_nms, merge_windows, prepare, tile_windows, tiling


def mosaic(bccd_dir, n=2):
    """An n x n mosaic of BCCD images (1280x960 for n=2), uint8 (H, W, 3): BCCD-like content."""
    paths = sorted((bccd_dir / "JPEGImages").glob("*.jpg"))[:n * n]
    ims = [np.asarray(Image.open(p).convert("RGB").resize((640, 480))) for p in paths]
    return np.concatenate([np.concatenate(ims[r * n:(r + 1) * n], 1) for r in range(n)], 0)


def write_pyramid(path, pixels, levels=2, tile=256, compression="zlib"):
    """A tiled pyramidal TIFF (level k: every 2**k-th pixel), lossless so that its pixels are the array's."""
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, tile=(tile, tile), subifds=levels - 1, compression=compression)
        for k in range(1, levels):
            tif.write(np.ascontiguousarray(pixels[::2 ** k, ::2 ** k]), tile=(tile, tile), subfiletype=1,
                      compression=compression)
    return path


def fake_run(batch):
    """Stands in for detect.predict: lists over the inputs of boxes, labels and scores that depend on its pixels (so
    that a different input shows)."""
    out = []
    for x in batch.float():
        m = x.mean((1, 2)) / 255  # (3,)
        boxes = torch.stack([torch.tensor([0.1, 0.1, 0.3, 0.3]) + m[0] * 0.5, torch.tensor([0.5, 0.4, 0.7, 0.65]) * m[1]
                             + 0.1, torch.tensor([0.02, 0.6, 0.2, 0.98]) + 0 * m[2]]).clamp(0, 1)
        out.append((boxes, torch.tensor([1, 2, 1]), torch.stack([m[0], m[1], m[2]])))
    return tuple(map(list, zip(*out)))


def item_of(image_files, index=0):
    """The one item ImageFiles.read gives (in_batches' form), its errors."""
    errors = []
    items = list(ImageFiles.read(image_files.paths[index:index + 1], image_files.tiles, 0, errors,
                                 image_files.reading))
    return items, errors


def test_a_pyramid_gives_the_inputs_and_detections_of_the_same_pixels_as_a_png(bccd_dir, tmp_path, capsys):
    """Level 0 at scale 1, as the PNG of level 0; level 1 (red cells given twice as wide) as the PNG of level 1."""
    pixels = mosaic(bccd_dir)
    tif = write_pyramid(tmp_path / "m.tif", pixels)
    Image.fromarray(pixels).save(tmp_path / "m.png")
    Image.fromarray(np.ascontiguousarray(pixels[::2, ::2])).save(tmp_path / "m1.png")
    for rbc_width, png, factor in ((106, "m.png", 1), (212, "m1.png", 2)):
        tiles = tiling(BCCD_FIELD, scale=rbc_width / 106)
        (item,), errors = item_of(ImageFiles([str(tif)], tiles, Reading(rbc_width=rbc_width)))
        assert not errors
        (_, overview_, windows), size, windows_, inputs, (level_tiles, downsample) = item
        assert downsample == (factor, factor) and size == (1280 // factor, 960 // factor)
        inputs = list(inputs)
        image = open_image(tmp_path / png)
        plain_tiles = tiling(BCCD_FIELD)
        want_windows, want_inputs = prepare(image, plain_tiles)
        assert windows == want_windows and level_tiles == plain_tiles
        assert torch.equal(torch.stack(inputs), want_inputs)  # the very same model inputs
        (_, got_boxes, got_labels, got_scores), = in_batches(fake_run, [(None, size, windows, iter(inputs),
                                                                        (level_tiles, downsample))], tiles, 3, 0.45)
        (_, boxes, labels, scores), = in_batches(fake_run, [(None, size, *prepare(image, plain_tiles))], plain_tiles,
                                                 3, 0.45)
        assert len(boxes) >= 3
        torch.testing.assert_close(got_boxes, boxes * factor)  # in pixels of level 0
        assert torch.equal(got_labels, labels) and torch.equal(got_scores, scores)
    assert "note: " in capsys.readouterr().err


def test_the_command_line_counts_a_pyramid_as_its_png(bccd_dir, tmp_path, run_main, untrained_checkpoint):
    pixels = mosaic(bccd_dir)[:480, :900]  # 2 windows
    (tmp_path / "in").mkdir()
    write_pyramid(tmp_path / "in" / "a.tif", pixels)
    Image.fromarray(pixels).save(tmp_path / "in" / "b.png")
    r = run_main("detect.py", tmp_path / "in", "--checkpoint", untrained_checkpoint, "--output-dir", tmp_path / "out",
                 "--rbc-width", "106")
    assert r.returncode == 0, r.stderr
    a, b = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert a["image"].endswith("a.tif") and a["level"]["index"] == 0 and (a["width"], a["height"]) == (900, 480)
    assert "overview" not in a  # full size: the annotated image is the image
    assert a["windows"] == b["windows"] == 2 and a["labels"] == b["labels"]
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.11)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def test_choose_level_takes_the_coarsest_level_whose_cells_are_large_enough():
    levels = [Level(100_000, 80_000, (1, 1)), Level(25_000, 20_000, (4.0002, 4.0002)), Level(6250, 5000, (16, 16))]
    assert choose_level(levels, 30) == (0, pytest.approx(30 / 106))  # 40x: cells smaller than the model's anyway
    assert choose_level(levels, 424)[0] == 1  # 106 px at level 1 (4.0002: rarely exact, LEVEL_SLACK)
    assert choose_level(levels, 424 * 4)[0] == 2 and choose_level(levels, 424 * 4 * 0.9)[0] == 1
    assert choose_level(levels[::-1], 424)[0] == 1  # whatever the order
    field = (1280, 960)  # a model trained on twice BCCD's field wants cells twice as wide
    assert choose_level(levels, 424, field) == (0, pytest.approx(2.0)) and choose_level(levels, 848, field)[0] == 1


def test_the_cells_size_comes_from_the_flags_then_the_slides_microns_per_pixel():
    assert cell_width(Reading(), 0.25)[0] == pytest.approx(30)  # 7.5 um / 0.25 um per pixel
    assert cell_width(Reading(rbc_width=50), 0.25) == (50, "--rbc-width/--scale")
    assert cell_width(Reading(), None)[0] == 106
    levels = [Level(40_000, 40_000, (1, 1)), Level(10_000, 10_000, (4, 4))]
    mpp = slides.BCCD_MPP / 4  # cells 424 px wide at level 0: level 1 at scale 1
    source = ArraySource(torch.zeros(3, 1, 1, dtype=torch.uint8))
    source.levels, source.mpp = levels, mpp
    plan = plan_source("x.tif", "tiff", source, Reading(), tiling(BCCD_FIELD))
    assert plan.level == 1 and plan.tiles[:2] == tiling(BCCD_FIELD)[:2]  # scale 1 there


def test_a_slide_of_more_windows_than_streamed_is_one_line_naming_the_flags():
    source = ArraySource(torch.zeros(3, 1, 1, dtype=torch.uint8))
    source.levels, source.mpp = [Level(100_000, 80_000, (1, 1))], 0.25  # a 40x scan: red cells 30 px wide
    with pytest.raises(slides.UserError) as refused:
        plan_source("x.svs", "openslide", source, Reading(), tiling(BCCD_FIELD))
    message = str(refused.value)
    assert "windows of 181x136 px, more than 100,000: give a larger --scale or --rbc-width, or a larger --tile" in message
    assert "--tile off" not in message and "\n" not in message  # which a slide refuses


def test_microns_per_pixel_are_read_from_ome_xml_and_resolution_tags(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    pixels = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "a.ome.tif", pixels, ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                                                                          "PhysicalSizeXUnit": "µm"})
    tifffile.imwrite(tmp_path / "b.tif", pixels, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "c.tif", pixels, resolution=(300, 300), resolutionunit="INCH")  # a placeholder
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as a, tifffile.TiffFile(tmp_path / "b.tif") as b, \
            tifffile.TiffFile(tmp_path / "c.tif") as c:
        assert slides.tiff_mpp(a) == pytest.approx(0.5) and slides.tiff_mpp(b) == pytest.approx(0.25)
        assert slides.tiff_mpp(c) is None


def test_openslide_levels_and_microns_per_pixel(monkeypatch):
    openslide = pytest.importorskip("openslide")

    class FakeSlide:
        level_dimensions, level_downsamples = ((4000, 3000), (1000, 750)), (1.0, 4.0)
        properties = {"openslide.mpp-x": "0.0177"}  # cells 424 px wide: level 1
        reads = []

        def __init__(self, path):
            pass

        def read_region(self, location, level, size):
            self.reads.append((location, level, size))
            im = Image.new("RGBA", size, (10, 20, 30, 255))
            im.putpixel((0, 0), (0, 0, 0, 0))  # transparent: glass, read as white
            return im

        def close(self):
            pass

    monkeypatch.setattr(openslide, "OpenSlide", FakeSlide)
    source = OpenSlideSource("x.svs")
    assert source.levels[1] == Level(1000, 750, (4.0, 4.0))
    plan = plan_source("x.svs", "openslide", source, Reading(), tiling(BCCD_FIELD))
    assert plan.level == 1 and plan.windows is not None
    region = source.read(1, 100, 50, 164, 98)
    assert region.shape == (48, 64, 3) and tuple(region[0, 0]) == (255,) * 3 and tuple(region[1, 1]) == (10, 20, 30)
    assert FakeSlide.reads[-1] == ((400, 200), 1, (64, 48))  # the location in pixels of level 0


def test_a_failed_openslide_read_is_blank_and_the_next_reads_go_on(monkeypatch):
    """OpenSlide keeps an error in its handle (every later read_region fails): the source opens the slide again."""
    openslide = pytest.importorskip("openslide")
    opened = []

    class FailingOnce:
        level_dimensions, level_downsamples, properties = ((400, 300),), (1.0,), {}

        def __init__(self, path):
            opened.append(path)
            self.broken = len(opened) == 1

        def read_region(self, location, level, size):
            if self.broken:
                raise openslide.OpenSlideError("a damaged tile: and every read after it, on this handle")
            return Image.new("RGBA", size, (10, 20, 30, 255))

        def close(self):
            pass

    monkeypatch.setattr(openslide, "OpenSlide", FailingOnce)
    source = OpenSlideSource("x.svs")
    assert (source.read(0, 0, 0, 8, 8) == 255).all() and source.bad_tiles == 1
    assert tuple(source.read(0, 8, 0, 16, 8)[0, 0]) == (10, 20, 30) and opened == ["x.svs", "x.svs"]


class CountingSource(ArraySource):
    def __init__(self, image):
        super().__init__(image)
        self.reads = []

    def read(self, level, x0, y0, x1, y1):
        self.reads.append((x1 - x0, y1 - y0))
        return super().read(level, x0, y0, x1, y1)


def test_windows_are_read_one_region_at_a_time_never_the_whole_level(monkeypatch, capsys):
    image = torch.randint(0, 256, (3, 2000, 3000), dtype=torch.uint8)
    source = CountingSource(image)
    monkeypatch.setattr(slides, "open_source", lambda path, kind: source)
    tiles = tiling(BCCD_FIELD)
    windows = tile_windows(3000, 2000, tiles)
    plan = Plan("big.tif", "tiff", 0, source.levels, tiles, windows, "test")
    inputs = window_inputs(plan, "big.tif", [])
    first = next(inputs)
    assert source.reads == [(640, 480)]  # lazily: one window read for one input
    rest = list(inputs)
    assert len(source.reads) == len(windows) == 1 + len(rest) and max(w * h for w, h in source.reads) <= 640 * 480
    assert torch.equal(torch.stack([first, *rest]), prepare(image, tiles)[1])
    assert f"{len(windows)} window(s)" in capsys.readouterr().err


def test_progress_is_said_every_few_seconds_not_every_window(monkeypatch, capsys):
    image = torch.zeros(3, 1500, 2000, dtype=torch.uint8)
    monkeypatch.setattr(slides, "open_source", lambda path, kind: ArraySource(image))
    tiles = tiling(BCCD_FIELD)
    plan = Plan("big.tif", "tiff", 0, [Level(2000, 1500, (1, 1))], tiles, tile_windows(2000, 1500, tiles), "test")
    clock = iter(range(0, 10**6, 2))  # two seconds a window
    monkeypatch.setattr(slides.time, "perf_counter", lambda: next(clock))
    list(window_inputs(plan, "big.tif", []))
    lines = [line for line in capsys.readouterr().err.splitlines() if "windows, about" in line]
    n = len(plan.windows)
    assert 0 < len(lines) <= n / 2 and all(f"of {n} windows" in line and "left" in line for line in lines)


def test_the_overview_is_the_image_reduced_whole_and_at_most_overview_pixels(monkeypatch):
    monkeypatch.setattr(slides, "OVERVIEW", 500)
    monkeypatch.setattr(slides, "CHUNK", 128)
    image = torch.randint(0, 256, (3, 700, 1999), dtype=torch.uint8)
    picture, factor = overview(ArraySource(image))
    want = Image.fromarray(image.permute(1, 2, 0).numpy()).reduce(4)
    assert max(picture.size) <= 500 and picture.size == want.size and factor == (500 / 1999, 175 / 700)
    assert np.array_equal(np.asarray(picture), np.asarray(want))  # chunks aligned to the reduction: no seams


def test_an_image_beyond_pils_limit_names_the_flag_and_is_read_with_it(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL's limit: twice this
    path = tmp_path / "huge.jpg"
    Image.fromarray(np.full((150, 200, 3), 128, np.uint8)).save(path)
    (i, image, message), = ImageFiles([str(path)], tiling(BCCD_FIELD))
    assert image is None and "\n" not in message and message.startswith(str(path))
    assert "--max-pixels 30000" in message and "vips tiffsave" in message
    (item,), errors = item_of(ImageFiles([str(path)], tiling(BCCD_FIELD), Reading(max_pixels=30_000)))
    assert not errors and item[0][1].record["width"] == 200  # read whole, then as a slide of one level
    assert Image.MAX_IMAGE_PIXELS == 10_000  # left as it was
    (i, image, message), = ImageFiles([str(path)], tiling(BCCD_FIELD), Reading(max_pixels=20_000))
    assert "more than --max-pixels (20,000)" in message


def test_the_command_line_with_max_pixels(monkeypatch, tmp_path, run_main, untrained_checkpoint):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    Image.fromarray(np.full((150, 200, 3), 128, np.uint8)).save(tmp_path / "huge.jpg")
    args = [tmp_path / "huge.jpg", "--checkpoint", untrained_checkpoint, "--output-dir", tmp_path / "out"]
    assert_one_line_error(run_main("detect.py", *args), "detect.py", ["huge.jpg", "--max-pixels 30000"])
    r = run_main("detect.py", *args, "--max-pixels", "30000")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "detections.json").read_text())[0]["width"] == 200
    assert_one_line_error(run_main("detect.py", *args, "--max-pixels", "0"), "detect.py", "--max-pixels")


def test_a_missing_extra_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide fails
    monkeypatch.setitem(sys.modules, "tifffile", None)
    (tmp_path / "s.svs").write_bytes(b"not a slide")
    (i, image, message), = ImageFiles([str(tmp_path / "s.svs")], tiling(BCCD_FIELD))
    assert image is None and "\n" not in message and "pip install -r requirements-slides.txt" in message
    assert "openslide" in message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.tif")  # a TIFF beyond PIL's limit
    (i, image, message), = ImageFiles([str(tmp_path / "big.tif")], tiling(BCCD_FIELD))
    assert image is None and "pip install -r requirements-slides.txt" in message and "--max-pixels" in message


def test_a_truncated_tiff_is_one_line_and_the_run_goes_on(bccd_dir, tmp_path, run_main, untrained_checkpoint):
    pixels = mosaic(bccd_dir)
    (tmp_path / "in").mkdir()
    tif = write_pyramid(tmp_path / "in" / "a.tif", pixels)
    tif.write_bytes(tif.read_bytes()[:tif.stat().st_size * 3 // 5])
    (i, image, message), = ImageFiles([str(tif)], tiling(BCCD_FIELD))
    assert image is None and message.startswith(str(tif)) and "\n" not in message
    Image.fromarray(pixels[:480, :640]).save(tmp_path / "in" / "b.png")
    r = run_main("detect.py", tmp_path / "in", "--checkpoint", untrained_checkpoint, "--output-dir", tmp_path / "out")
    assert_one_line_error(r, "detect.py", "a.tif")
    assert (tmp_path / "out" / "counts.csv").read_text().splitlines()[1].split(",")[0].endswith("b.png")


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_a_slide_that_no_longer_opens_as_planned_is_said_and_the_next_image_counted(bccd_dir, tmp_path, monkeypatch,
                                                                                     change):
    """A slide is planned where it is read (a worker), and opened again where its windows are read: removed or
    rewritten in between, it is one error and left out, not the end of the run nor windows of another image."""
    pixels = mosaic(bccd_dir)
    tif, png = write_pyramid(tmp_path / "a.tif", pixels), tmp_path / "b.png"
    Image.fromarray(pixels[:480, :640]).save(png)
    planned = files.plan

    def plan_then_change(path, *args):
        result = planned(path, *args)
        if path == str(tif):
            tif.unlink() if change == "removed" else write_pyramid(tif, pixels, levels=3)
        return result

    monkeypatch.setattr(files, "plan", plan_then_change)
    errors = []
    items = list(ImageFiles.read([str(tif), str(png)], tiling(BCCD_FIELD), 0, errors))
    assert [item[0][0] for item in items] == [1]  # b.png, counted
    assert len(errors) == 1 and errors[0].startswith(f"{tif}: ") and "\n" not in errors[0]
    assert ("changed" if change == "changed" else "No such file") in errors[0]


def test_a_damaged_tile_is_read_blank_and_said(bccd_dir, tmp_path):
    pixels = mosaic(bccd_dir)
    tif = write_pyramid(tmp_path / "a.tif", pixels, levels=1)
    source = slides.TiffSource(str(tif))
    page = source.pages[0]
    offset = page.dataoffsets[4]  # the last tile of the first row: x 1024-1280, y 0-256
    source.close()
    data = bytearray(tif.read_bytes())
    data[offset:offset + 64] = b"\xff" * 64  # zlib cannot inflate this
    tif.write_bytes(bytes(data))
    source = slides.TiffSource(str(tif))
    region = source.read(0, 0, 0, 1280, 960)
    assert source.bad_tiles == 1 and (region[:256, 1024:] == 255).all()
    assert np.array_equal(region[:, :1024], pixels[:, :1024]) and np.array_equal(region[256:], pixels[256:])
    source.close()


def test_an_empty_tile_of_a_sparse_tiff_is_glass_not_damage(bccd_dir, tmp_path):
    pixels = mosaic(bccd_dir)
    tif = write_pyramid(tmp_path / "a.tif", pixels, levels=1)
    source = slides.TiffSource(str(tif))
    page = source.pages[0]  # as a sparse TIFF leaves a tile of empty glass out: byte count 0
    page.databytecounts = tuple(0 if i == 4 else n for i, n in enumerate(page.databytecounts))
    region = source.read(0, 0, 0, 1280, 960)
    assert source.bad_tiles == 0 and (region[:256, 1024:] == 255).all()
    assert np.array_equal(region[:, :1024], pixels[:, :1024])
    source.close()


def test_a_level_stored_in_one_huge_strip_is_refused_not_read_whole(tmp_path, monkeypatch):
    """tifffile's and PIL's default TIFF is one strip: reading any region of it would decode the whole image."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "strip.tif", np.zeros((600, 800, 3), np.uint8))
    monkeypatch.setattr(slides, "MAX_SEGMENT_BYTES", 600 * 800 * 3 - 1)  # as a 20000x20000 strip is over 64 MB
    source = slides.TiffSource(str(tmp_path / "strip.tif"))
    with pytest.raises(slides.UserError, match="stored in strips of 800x600 px, too large to read by region.*vips"):
        source.check()
    source.close()


def test_a_pyramid_whose_pixels_are_not_grey_or_rgb_is_refused(tmp_path):
    """MinIsWhite (or a palette, or CMYK) read as grey or RGB would be other colours, and other counts."""
    tifffile = pytest.importorskip("tifffile")
    grey = np.zeros((512, 512), np.uint8)
    with tifffile.TiffWriter(tmp_path / "w.tif") as tif:
        tif.write(grey, tile=(256, 256), subifds=1, photometric="miniswhite")
        tif.write(grey[::2, ::2], tile=(256, 256), subfiletype=1, photometric="miniswhite")
    source = slides.TiffSource(str(tmp_path / "w.tif"))
    with pytest.raises(slides.UserError, match="its pixels are MINISWHITE.*only grey, RGB or JPEG's YCbCr.*vips"):
        source.check()
    source.close()


def test_find_images_finds_slides(tmp_path):
    for name in ("a.svs", "b.ndpi", "c.mrxs", "d.ome.tif", "e.tiff", "f.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in find_images([str(tmp_path)])[0]] == ["a.svs", "b.ndpi", "c.mrxs",
                                                                             "d.ome.tif", "e.tiff"]


def test_a_slides_boxes_are_drawn_on_its_overview():
    picture = Image.new("RGB", (100, 50))
    image = slides.Overview(picture, (0.1, 0.05), {"width": 1000})
    pil, drawn, about = drawable(image, torch.tensor([[100., 100., 200., 300.]]))
    assert pil is picture and about == {"width": 1000}
    assert torch.allclose(drawn, torch.tensor([[10., 5., 20., 15.]]))


@pytest.mark.parametrize("seed", range(4))
def test_local_nms_keeps_what_batched_nms_keeps(seed):
    from torchvision.ops import batched_nms
    g = torch.Generator().manual_seed(seed)
    n = [0, 1, 700, 5000][seed]
    xy = torch.rand(n, 2, generator=g) * torch.tensor([3000., 1000.] if seed % 2 else [800., 2500.])
    boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 100], 1)
    scores, labels = torch.rand(n, generator=g), torch.randint(1, 4, (n,), generator=g)
    for overlap in (0.3, 0.5):
        assert torch.equal(local_nms(boxes, scores, labels, overlap, chunk=97),
                           batched_nms(boxes, scores, labels, overlap))


def test_merging_thousands_of_windows_counts_each_cell_once(monkeypatch):
    """A 20,000 x 6,000 image at scale 1: 3,060 windows, each seeing the cells of a grid that lie in it, as fractions
    of the window (cells cut by its edges cut too); more than NMS_AT_ONCE boxes, so local_nms runs."""
    import tiling as tiling_module
    calls = []
    monkeypatch.setattr(tiling_module, "local_nms", lambda *a: calls.append(len(a[0])) or local_nms(*a))
    tiles = tiling(BCCD_FIELD)
    size = (20_000, 6_000)
    windows = tile_windows(*size, tiles, limit=10**6)
    xs, ys = torch.meshgrid(torch.arange(60., size[0] - 100, 150), torch.arange(60., size[1] - 100, 150), indexing="ij")
    cells = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 90, ys.flatten() + 90], 1)  # x-major order
    boxes, labels, scores = [], [], []
    for x0, y0, x1, y1 in windows:
        seen = cells.clone()
        seen[:, 0::2] = seen[:, 0::2].clamp(x0, x1)
        seen[:, 1::2] = seen[:, 1::2].clamp(y0, y1)
        seen = seen[((seen[:, 2:] - seen[:, :2]) > 0).all(1)]
        boxes.append((seen - torch.tensor([x0, y0, x0, y0])) / torch.tensor([x1 - x0, y1 - y0] * 2))
        labels.append(torch.ones(len(seen), dtype=torch.long))
        scores.append(torch.rand(len(seen)))
    merged, _, _ = merge_windows(boxes, labels, scores, windows, size, tiles.margin, 0.45)
    assert len(windows) > 3000 and calls and calls[0] > 4000
    assert len(merged) == len(cells)
    torch.testing.assert_close(merged[torch.argsort(merged[:, 0] * 1e5 + merged[:, 1])], cells, atol=0.01, rtol=0)


def test_a_plain_tiff_takes_todays_path_whatever_its_samples(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    grey = (np.arange(300 * 200, dtype=np.uint16).reshape(200, 300) * 7)
    tifffile.imwrite(tmp_path / "grey16.tif", grey)  # 16-bit grey: PIL reads it, the region path would not
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((200, 300, 3), np.uint8), tile=(64, 64))  # tiled, one level
    for name in ("grey16.tif", "rgb.tif"):
        (i, image, prepared), = ImageFiles([str(tmp_path / name)], tiling(BCCD_FIELD))
        assert torch.is_tensor(image) and image.shape == (3, 200, 300)
        assert torch.equal(image, open_image(tmp_path / name))


def test_an_aperio_slide_through_openslide_gives_the_inputs_of_its_level_held_whole(bccd_dir, tmp_path):
    """A real SVS (tifffile writes Aperio's layout): OpenSlide's levels, its microns per pixel (red cells 212 px wide
    at level 0: level 1 at scale 1), and each window read from it as tiling.prepare cuts the level held whole."""
    pytest.importorskip("openslide")
    tifffile = pytest.importorskip("tifffile")
    pixels = np.repeat(np.repeat(mosaic(bccd_dir), 2, 0), 2, 1)  # 2560x1920: BCCD's cells twice as wide
    head = "Aperio Image Library v12.0.0\r\n"
    with tifffile.TiffWriter(tmp_path / "s.svs") as tif:
        tif.write(pixels, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                  description=head + f"2560x1920 [0,0 2560x1920] (256x256) JPEG/RGB|MPP = {slides.BCCD_MPP / 2:.6f}")
        tif.write(np.ascontiguousarray(pixels[::2, ::2]), tile=(256, 256), compression="jpeg", photometric="rgb",
                  metadata=None, description=head + "1280x960 -> 1280x960")
    with tifffile.TiffFile(tmp_path / "s.svs") as tif:
        level1 = torch.from_numpy(tif.pages[1].asarray()).permute(2, 0, 1)  # as decoded from the file
    (item,), errors = item_of(ImageFiles([str(tmp_path / "s.svs")], tiling(BCCD_FIELD), Reading()))
    (_, picture, windows), size, _, inputs, (level_tiles, downsample) = item
    assert not errors and size == (1280, 960) and downsample == (2.0, 2.0)
    assert picture.record["level"]["index"] == 1 and picture.record["width"] == 2560
    want_windows, want_inputs = prepare(level1, tiling(BCCD_FIELD))
    assert windows == want_windows and len(windows) == 20
    assert torch.equal(torch.stack(list(inputs)), want_inputs)


def test_a_stopped_run_with_a_slide_is_taken_up(bccd_dir, tmp_path, run_main, untrained_checkpoint, monkeypatch):
    import files
    pixels = mosaic(bccd_dir)
    (tmp_path / "in").mkdir()
    write_pyramid(tmp_path / "in" / "a.tif", pixels[:480, :640])  # two levels: read by region, one window
    Image.fromarray(pixels[480:720, 640:960]).save(tmp_path / "in" / "b.png")
    command = [tmp_path / "in", "--checkpoint", untrained_checkpoint, "--output-dir", tmp_path / "out"]
    add = files.Results.add

    def add_then_stop(self, *args, **kwargs):  # Ctrl-C once the slide is counted
        add(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.Results, "add", add_then_stop)
    assert run_main("detect.py", *command).returncode == 130
    slide = files.read_record(tmp_path / "out" / files.JOURNAL)[1]
    assert slide["image"].endswith("a.tif") and slide["level"]["index"] == 0
    monkeypatch.setattr(files.Results, "add", add)
    r = run_main("detect.py", *command)
    assert r.returncode == 0 and "1 of 2 image(s) were counted" in r.stdout, r.stderr
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert records[0] == slide and records[1]["image"].endswith("b.png")


def test_a_codec_missing_is_one_line_not_blank_tiles(bccd_dir, tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    tif = write_pyramid(tmp_path / "j.tif", mosaic(bccd_dir), compression="jpeg")
    fallback = pytest.importorskip("tifffile._imagecodecs")  # tifffile's pure-Python codecs: no JPEG
    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", fallback)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    (i, image, message), = ImageFiles([str(tif)], tiling(BCCD_FIELD))
    assert image is None and "\n" not in message and "JPEG" in message and "requirements-slides.txt" in message
