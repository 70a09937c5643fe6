"""Export a checkpoint for fast inference on a CPU: ONNX (run by ONNX Runtime) or OpenVINO, optionally int8.

    $ pip install -r requirements-export.txt                 # ONNX, ONNX Runtime, OpenVINO, NNCF (optional extras)
    $ python export.py --int8 --calibrate my_fields/         # the shipped model -> weights/ssd300_bccd-int8.xml, .bin
    $ python detect.py --checkpoint weights/ssd300_bccd-int8.xml scan-4k.jpg   # as with the .pt, faster
    $ python export.py --int8 --data-folder data/lists-val   # calibrated on the TRAIN images of the lists instead
    $ python export.py --checkpoint runs/ssd300/checkpoint.pt --format onnx --output exports/ssd300   # -> .onnx

What is exported is the network alone, from normalized images (N, 3, 300, 300) to its raw (locs, scores): the
priors, the decoding (SSD300.detect_objects), NMS and tiling stay in this project's code, shared with the PyTorch
path, so that the paths differ only in the network. The export carries, as plain JSON metadata, what detect.py
needs beside the network (the label map, the counting thresholds, the training field, the prior scales) and where
it came from (the checkpoint, its sha256 and provenance, the export command, the versions). detect.py, eval.py and
detect.load_model take the .onnx or .xml in place of a checkpoint (ExportedSSD300 runs it on the CPU).

--int8 quantizes the network after training (NNCF's post-training quantization: per-tensor activation ranges
measured on up to --calibration-images images, as detect.py feeds them to the model: resized whole, or cut into
windows of the training field). --calibrate FOLDER takes them from any folder of images, without annotations:
calibrate on the lab's own fields, like those the model will count. Without it, they are the TRAIN images of the
lists in --data-folder (never TEST's): for the shipped model, trained on ImageSets' trainval.txt, the lists of
`create_data_lists.py`.

--output PATH writes PATH.onnx, or PATH.xml and PATH.bin (a PATH ending in .onnx or .xml is taken as it is);
by default beside the checkpoint, named after it (-int8 for --int8). It is checked before the work, is never
one of the inputs, and is written atomically: a failed or interrupted export leaves an earlier one whole.
"""
import argparse
import inspect
import io
import json
import os
import tempfile
import time
import warnings
from importlib import metadata as package_metadata

import torch

from detect import DEFAULT_CHECKPOINT, load_model
from exported import METADATA_KEY, METADATA_VERSION, first_line, load_export, need, sha256
from files import find_images, open_image
from misc import UserError, check_not_an_input, check_writable, load_checkpoint, repo_relative, run_cli, run_info
from tiling import prepare, tiling
from utils import check_same_classes, normalize

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}  # an OpenVINO model is its .xml (the graph) and .bin (the weights)
OPSET = 17  # ONNX opset: ONNX Runtime >= 1.12 and OpenVINO >= 2022.1 read it
# checkpoint keys that the export carries as they are (detect.load_model reads them as from a checkpoint)
CARRIED = ("label_map", "model_args", "count_thresholds", "tta", "field", "args", "provenance")


def get_args_parser():
    p = argparse.ArgumentParser("export.py", description="Export SSD300 to ONNX or OpenVINO for fast CPU inference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt written by train.py (default: the "
                   "shipped model)")
    p.add_argument("--format", default="openvino", choices=sorted(FORMATS), help="openvino: the fast path on a CPU "
                   "(README, 'Counting faster on a CPU'); onnx: the portable format, run by ONNX Runtime")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (NNCF), calibrated on --calibrate's images, "
                   "else the TRAIN images of --data-folder")
    p.add_argument("--calibrate", default=None, metavar="FOLDER", help="--int8: calibrate on the images of this folder "
                   "(any images, no annotations: best, the lab's own fields)")
    p.add_argument("--data-folder", default="data/lists", help="--int8 without --calibrate: lists from "
                   "create_data_lists.py whose TRAIN images calibrate it (the images the model was trained on)")
    p.add_argument("--calibration-images", type=int, default=64, help="--int8: how many images, spread evenly over "
                   "the folder or list, calibrate it (more: slower, rarely better)")
    p.add_argument("--output", default=None, help="PATH: writes PATH.onnx or PATH.xml + PATH.bin (default: beside "
                   "the checkpoint, named after it)")
    return p


def output_paths(output, checkpoint, fmt, int8):
    """The files an export writes: [PATH.onnx] or [PATH.xml, PATH.bin]."""
    ext = FORMATS[fmt]
    if output is None:
        output = os.path.splitext(checkpoint)[0] + ("-int8" if int8 else "")
    if not str(output).strip():
        raise UserError("--output is empty: name a file")
    if os.path.basename(output) in ("", ".", ".."):  # "exports/": it would write exports/.onnx
        raise UserError(f"--output {output}: a folder; name a file in it, e.g. {os.path.join(output, 'ssd300' + ext)}")
    base, given = os.path.splitext(output)
    if given.lower() in (".onnx", ".xml", ".bin"):
        if given.lower() != ext:
            raise UserError(f"--output {output}: a {fmt} export is {ext}, not {given}")
        output = base
    return [output + ext] + ([output + ".bin"] if fmt == "openvino" else [])


def check_outputs(paths, checkpoint, data_folder):
    """Before the work: every output file can be written, and none is an input (the checkpoint, the lists)."""
    for path in paths:
        check_writable(path, "--output", create=False)  # its folder is made when the export is written
        check_not_an_input(path, "--output", checkpoint, data_folder)


def calibration_list(data_folder, n, label_map, checkpoint):
    """n TRAIN images of the lists (never TEST's), evenly spread over them: their paths."""
    from datasets import BCCDDataset
    train = BCCDDataset(data_folder, "train")
    check_same_classes(label_map, train.label_map, checkpoint, data_folder)
    if not 1 <= n <= len(train.images):
        raise UserError(f"--calibration-images {n}: give 1 to {len(train.images)}, the TRAIN images of {data_folder}")
    return [train.images[i * len(train.images) // n] for i in range(n)]


def calibration_folder(folder, n):
    """Up to n images of `folder` (searched as detect.py searches its inputs), evenly spread over them: their paths."""
    if not os.path.isdir(folder):
        raise UserError(f"--calibrate {folder}: no such folder")
    paths = find_images([folder])[0]
    if not paths:
        raise UserError(f"--calibrate {folder}: no images in it")
    return [paths[i * len(paths) // min(n, len(paths))] for i in range(min(n, len(paths)))]


def calibration_images(paths, tiles, n):
    """The model's inputs of the images `paths` as detect.py makes them (tiling.prepare: an image resized whole, or
    its windows), at most n, evenly spread: normalized float32 arrays (1, 3, 300, 300)."""
    inputs, per_image = [], -(-n // len(paths))
    for path in paths:
        if not os.path.isfile(path):  # a pipe or a device: opening it could wait for ever
            raise UserError(f"{path}: not a regular file (a pipe, socket or device), not a calibration image")
        try:
            image = open_image(path)
        except UserError as e:  # too large: its message names the fixes
            raise UserError(f"{path}: cannot read the calibration image: {e}") from None
        except Exception as e:  # PIL raises many kinds
            raise UserError(f"{path}: cannot read the calibration image ({type(e).__name__}: "
                            f"{first_line(e)})") from None
        try:
            windows = prepare(image, tiles)[1]
        except UserError as e:  # too many windows
            raise UserError(f"{path}: {e}") from None
        k = min(per_image, len(windows))
        inputs += [windows[(2 * i + 1) * len(windows) // (2 * k)] for i in range(k)]  # spread, away from the edges
    return [normalize(inputs[i * len(inputs) // min(n, len(inputs))][None]).numpy() for i in range(min(n, len(inputs)))]


def to_onnx(model):
    """The network of an SSD300 (in eval mode, BatchNorm folded) as an onnx.ModelProto: input "images" (N, 3, 300,
    300) normalized float32, outputs "locs" (N, P, 4) and "scores" (N, P, C), the batch N free."""
    onnx = need("onnx", "export.py")
    model = model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    buffer = io.BytesIO()
    # TorchScript's exporter (dynamo=False): one graph for a plain conv net, with no more packages; still in torch 2.14
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}  # torch < 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice (torch >= 2.9), in favour of the dynamo exporter
        torch.onnx.export(model, (torch.zeros(1, 3, 300, 300),), buffer, input_names=["images"],
                          output_names=["locs", "scores"], opset_version=OPSET, do_constant_folding=True,
                          dynamic_axes={name: {0: "N"} for name in ("images", "locs", "scores")}, **kwargs)
    proto = onnx.load_from_string(buffer.getvalue())
    priors = len(model.priors_cxcy)
    for output, last in zip(proto.graph.output, (4, model.n_classes)):  # the exporter leaves P symbolic (a view(N, -1))
        dims = output.type.tensor_type.shape.dim
        dims[1].dim_value, dims[2].dim_value = priors, last
    return proto


def quantize(network, arrays):
    """int8 by NNCF's post-training quantization, activation ranges measured on `arrays` (calibration_images)."""
    nncf = need("nncf", "export.py --int8")
    # NNCF's ONNX backend takes {input name: array}, its OpenVINO one the array
    feed = (lambda x: {"images": x}) if type(network).__module__.startswith("onnx") else None
    return nncf.quantize(network, nncf.Dataset(arrays, feed), subset_size=len(arrays))


def write(save, path):
    """save() of a temporary file beside `path`; a write that fails (a full disk) is a UserError naming `path`."""
    try:
        save()
    except (OSError, RuntimeError) as e:  # OpenVINO's writer raises RuntimeError
        raise UserError(f"--output {path}: cannot write ({getattr(e, 'strerror', None) or first_line(e)}); nothing "
                        f"written") from None


def write_bytes(path, data):
    with open(path, "wb") as f:  # Python's file raises on a short write
        f.write(data)


def versions(*packages):
    found = {}
    for name in packages:
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            pass
    return found


def export_checkpoint(checkpoint, fmt="openvino", int8=False, output=None, data_folder="data/lists",
                      calibration=64, quiet=False, calibrate=None):
    """Export a train.py checkpoint (see the module's docstring); returns the path of the .onnx or .xml. int8:
    calibrated on the images of the folder `calibrate`, else on the TRAIN list of `data_folder`."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if os.path.splitext(str(checkpoint))[1].lower() in (".onnx", ".xml"):
        raise UserError(f"{checkpoint}: an export already; export.py takes a checkpoint.pt written by train.py")
    if int8 and not 1 <= calibration <= 10**5:
        raise UserError(f"--calibration-images must be 1 or more (up to the TRAIN images), not {calibration}")
    if calibrate is not None and not int8:
        raise UserError("--calibrate: it calibrates int8; give --int8 too")
    paths = output_paths(output, checkpoint, fmt, int8)
    check_outputs(paths, checkpoint, data_folder if int8 and calibrate is None else None)
    model = load_model(checkpoint, "cpu")  # checked as detect.py checks it; BatchNorm folded
    ckpt = load_checkpoint(checkpoint)
    chosen = None if not int8 else calibration_folder(calibrate, calibration) if calibrate is not None else \
        calibration_list(data_folder, calibration, model.label_map, checkpoint)
    need("onnx", "export.py")
    need("openvino" if fmt == "openvino" else "onnxruntime", f"export.py --format {fmt}")
    if int8:
        need("nncf", "export.py --int8")
    start = time.perf_counter()
    arrays = calibration_images(chosen, tiling(model.field), calibration) if int8 else None
    say(f"exporting {checkpoint} to {fmt}{' int8' if int8 else ''}"
        f"{f', calibrated on {len(arrays)} input(s) of {len(chosen)} image(s)' if int8 else ''} ...")
    metadata = {"version": METADATA_VERSION, "precision": "int8" if int8 else "fp32",
                **{key: ckpt[key] for key in CARRIED if key in ckpt},
                "checkpoint": {"path": repo_relative(checkpoint), "sha256": sha256(checkpoint)},
                "calibration": None if not int8 else {
                    "images": len(chosen), "inputs": len(arrays), "preprocess": "as detect.py: resized whole, or cut "
                    "into windows of the training field", **({"folder": repo_relative(calibrate)} if calibrate else
                                                              {"list": repo_relative(os.path.join(data_folder,
                                                                                                  "TRAIN_images.json"))})},
                "exported": {**run_info(torch.device("cpu")), "format": fmt,
                             **versions("onnx", "onnxruntime", "openvino", "nncf")}}
    text = json.dumps(metadata)
    proto = to_onnx(model)
    folder = os.path.dirname(os.path.abspath(paths[0]))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {paths[0]}: cannot make its folder ({e.strerror or e})") from None
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as tmp:
        if fmt == "onnx":
            if int8:
                proto = quantize(proto, arrays)
            del proto.metadata_props[:]
            proto.metadata_props.add(key=METADATA_KEY, value=text)
            written = [os.path.join(tmp, "model.onnx")]
            write(lambda: write_bytes(written[0], proto.SerializeToString()), paths[0])
        else:
            import openvino as ov
            write(lambda: write_bytes(os.path.join(tmp, "network.onnx"), proto.SerializeToString()), paths[0])
            network = ov.convert_model(os.path.join(tmp, "network.onnx"))
            os.remove(os.path.join(tmp, "network.onnx"))
            if int8:
                network = quantize(network, arrays)
            network.set_rt_info(text, [METADATA_KEY])
            written = [os.path.join(tmp, "model.xml"), os.path.join(tmp, "model.bin")]
            # fp32 weights, as eager (OpenVINO's default compresses them to fp16)
            write(lambda: ov.save_model(network, written[0], compress_to_fp16=False), paths[0])
            # the .xml records its .bin's sha256, so that a pair mixed by a replacement stopped between the two
            # files is refused when loaded; saved again with it (the .bin is written anew, the same bytes)
            network.set_rt_info(json.dumps({**metadata, "weights_sha256": sha256(written[1])}), [METADATA_KEY])
            write(lambda: ov.save_model(network, written[0], compress_to_fp16=False), paths[0])
        try:
            load_export(written[0])  # it runs and its metadata reads back, before it replaces anything
        except UserError as e:
            raise UserError(f"the export made does not load ({e}); nothing written") from None
        try:
            for src, dst in sorted(zip(written, paths), key=lambda p: p[1].endswith(".xml")):  # the .bin first
                os.replace(src, dst)
        except OSError as e:
            raise UserError(f"--output {paths[0]}: cannot write ({e.strerror or e})") from None
    say(f"written {' and '.join(paths)} ({sum(os.path.getsize(p) for p in paths) / 1e6:.0f} MB) in "
        f"{time.perf_counter() - start:.0f} s; run it with: python detect.py --checkpoint {paths[0]} IMAGES")
    return paths[0]


def main(args):
    export_checkpoint(args.checkpoint, args.format, args.int8, args.output, args.data_folder, args.calibration_images,
                      calibrate=args.calibrate)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
