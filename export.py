"""Export a checkpoint for fast inference on a CPU: ONNX (run by ONNX Runtime) or OpenVINO, optionally int8.

    $ pip install -r requirements-export.txt                 # ONNX, ONNX Runtime, OpenVINO, NNCF (optional extras)
    $ python export.py --int8 --data-folder data/lists-val   # the shipped model -> weights/ssd300_bccd-int8.xml, .bin
    $ python detect.py --checkpoint weights/ssd300_bccd-int8.xml scan-4k.jpg   # as with the .pt, faster
    $ python export.py --checkpoint runs/ssd300/checkpoint.pt --format onnx --output exports/ssd300   # -> .onnx

What is exported is the network alone, from normalized images (N, 3, 300, 300) to its raw (locs, scores): the
priors, the decoding (SSD300.detect_objects), NMS and tiling stay in this project's code, shared with the PyTorch
path, so that the paths differ only in the network. The export carries, as plain JSON metadata, what detect.py
needs beside the network (the label map, the counting thresholds, the training field, the prior scales) and where
it came from (the checkpoint, its sha256 and provenance, the export command, the versions). detect.py, eval.py and
detect.load_model take the .onnx or .xml in place of a checkpoint (ExportedSSD300 runs it on the CPU).

--int8 quantizes the network after training (NNCF's post-training quantization: per-tensor activation ranges
measured on --calibration-images images of the TRAIN list of --data-folder, resized whole as TEST images are;
never TEST's). Make the lists of the images the model was trained on: for the shipped model, trained on
ImageSets' train.txt, `create_data_lists.py --train-split train --test-split val --output-folder data/lists-val`.

--output PATH writes PATH.onnx, or PATH.xml and PATH.bin (a PATH ending in .onnx or .xml is taken as it is);
by default beside the checkpoint, named after it (-int8 for --int8). It is checked before the work, is never
one of the inputs, and is written atomically: a failed or interrupted export leaves an earlier one whole.
"""
import argparse
import hashlib
import inspect
import io
import json
import os
import tempfile
import time
import warnings
from importlib import metadata as package_metadata

import numpy as np
import torch
import torch.nn as nn

from misc import UserError, check_not_an_input, check_writable, load_checkpoint, repo_relative, run_cli, run_info
from model import SSD300, create_prior_boxes, valid_prior_scales  # after misc, which says in one line when
# torchvision does not fit torch
from utils import check_label_map, check_same_classes, normalize

FORMATS = {"onnx": ".onnx", "openvino": ".xml"}  # an OpenVINO model is its .xml (the graph) and .bin (the weights)
METADATA_KEY = "ssd300"  # ONNX metadata_props key / OpenVINO rt_info key of the JSON metadata
METADATA_VERSION = 1
MAX_METADATA = 1 << 20  # bytes: the label map and provenance take a few KB; a larger text is not ours
OPSET = 17  # ONNX opset: ONNX Runtime >= 1.12 and OpenVINO >= 2022.1 read it
INSTALL = "pip install -r requirements-export.txt"
# checkpoint keys that the export carries as they are (detect.load_model reads them as from a checkpoint)
CARRIED = ("label_map", "model_args", "count_thresholds", "tta", "field", "args", "provenance")


def get_args_parser():
    p = argparse.ArgumentParser("export.py", description="Export SSD300 to ONNX or OpenVINO for fast CPU inference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from detect import DEFAULT_CHECKPOINT
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint.pt written by train.py (default: the "
                   "shipped model)")
    p.add_argument("--format", default="openvino", choices=sorted(FORMATS), help="openvino: the fast path on a CPU "
                   "(README, 'Counting faster on a CPU'); onnx: the portable format, run by ONNX Runtime")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (NNCF), calibrated on TRAIN images")
    p.add_argument("--data-folder", default="data/lists", help="--int8: lists from create_data_lists.py whose TRAIN "
                   "images calibrate it (the images the model was trained on; never TEST's)")
    p.add_argument("--calibration-images", type=int, default=64, help="--int8: how many TRAIN images, spread evenly "
                   "over the list, calibrate it (more: slower, rarely better)")
    p.add_argument("--output", default=None, help="PATH: writes PATH.onnx or PATH.xml + PATH.bin (default: beside "
                   "the checkpoint, named after it)")
    return p


# ---------------------------------------------------------------------------------------------
# writing an export
# ---------------------------------------------------------------------------------------------

def need(module, what):
    """Import an optional runtime, or a one-line UserError naming the pip command."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{what} needs the package {module}, which is not installed: {INSTALL}") from None


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


def calibration_images(paths):
    """The images as the model sees them: normalized float32 arrays (1, 3, 300, 300), each resized whole as TEST
    images are (detect.preprocess)."""
    from detect import open_image, preprocess
    arrays = []
    for path in paths:
        try:
            image = open_image(path)
        except Exception as e:  # PIL raises many kinds
            raise UserError(f"{path}: cannot read the calibration image ({type(e).__name__})") from None
        arrays.append(normalize(preprocess(image)[None]).numpy())
    return arrays


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


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(*packages):
    found = {}
    for name in packages:
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            pass
    return found


def export_checkpoint(checkpoint, fmt="openvino", int8=False, output=None, data_folder="data/lists",
                      calibration=64, quiet=False):
    """Export a train.py checkpoint (see the module's docstring); returns the path of the .onnx or .xml."""
    from detect import load_model
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if os.path.splitext(str(checkpoint))[1].lower() in (".onnx", ".xml"):
        raise UserError(f"{checkpoint}: an export already; export.py takes a checkpoint.pt written by train.py")
    if int8 and not 1 <= calibration <= 10**5:
        raise UserError(f"--calibration-images must be 1 or more (up to the TRAIN images), not {calibration}")
    paths = output_paths(output, checkpoint, fmt, int8)
    check_outputs(paths, checkpoint, data_folder if int8 else None)
    model = load_model(checkpoint, "cpu")  # checked as detect.py checks it; BatchNorm folded
    ckpt = load_checkpoint(checkpoint)
    chosen = calibration_list(data_folder, calibration, model.label_map, checkpoint) if int8 else None
    need("onnx", "export.py")
    need("openvino" if fmt == "openvino" else "onnxruntime", f"export.py --format {fmt}")
    if int8:
        need("nncf", "export.py --int8")
    start = time.perf_counter()
    arrays = calibration_images(chosen) if int8 else None
    say(f"exporting {checkpoint} to {fmt}{' int8' if int8 else ''} ...")
    metadata = {"version": METADATA_VERSION, "precision": "int8" if int8 else "fp32",
                **{key: ckpt[key] for key in CARRIED if key in ckpt},
                "checkpoint": {"path": repo_relative(checkpoint), "sha256": sha256(checkpoint)},
                "calibration": ({"images": len(arrays), "list": repo_relative(os.path.join(data_folder,
                                 "TRAIN_images.json")), "preprocess": "resized whole, as TEST images"}
                                if int8 else None),
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


# ---------------------------------------------------------------------------------------------
# running an export: ExportedSSD300, in SSD300's place
# ---------------------------------------------------------------------------------------------

def is_export(path):
    """Whether detect.py and eval.py take `path` for an export (by its name: .onnx, or .xml for OpenVINO)."""
    return os.path.splitext(str(path))[1].lower() in (".onnx", ".xml")


def device_flag(flag, checkpoint):
    """The --device of a run of `checkpoint`: "auto" is the CPU for an export, which runs there only."""
    return "cpu" if flag == "auto" and is_export(checkpoint) else flag


class ExportedSSD300(nn.Module):
    """An exported network run by ONNX Runtime or OpenVINO on the CPU, in place of SSD300: forward maps normalized
    images (N, 3, 300, 300) to (locs (N, P, 4), scores (N, P, C)) as SSD300's does, and the priors, detect_objects
    and label maps are SSD300's own, so that detect.py's tiling and counting, eval.py and the Python API use it
    unchanged. `metadata` holds what the checkpoint held beside its weights (see export_checkpoint)."""
    detect_objects = SSD300.detect_objects  # the same decoding and NMS as the PyTorch path
    rev_label_map = SSD300.rev_label_map
    label_color_map = SSD300.label_color_map

    def __init__(self, run, metadata, runtime, source):
        super().__init__()
        self.run, self.metadata, self.runtime, self.source = run, metadata, runtime, source
        self.label_map = dict(metadata["label_map"])
        self.n_classes = len(self.label_map)
        self.prior_scales = tuple(float(s) for s in metadata["model_args"]["prior_scales"])
        self.register_buffer("priors_cxcy", create_prior_boxes(self.prior_scales), persistent=False)
        # the runtime takes its inputs on the CPU: detect.py and eval.py find the device as an SSD300's,
        # next(model.parameters()).device, here of this empty parameter
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, images):  # (N, 3, 300, 300) normalized -> (N, P, 4), (N, P, C)
        try:
            locs, scores = self.run(np.ascontiguousarray(images.detach().float().cpu().numpy()))
        except Exception as e:  # a network that declared SSD300's shapes and cannot make them
            raise UserError(f"{self.source}: {self.runtime} failed to run it ({first_line(e)})") from None
        expected = ((len(images), len(self.priors_cxcy), 4), (len(images), len(self.priors_cxcy), self.n_classes))
        if (locs.shape, scores.shape) != expected or locs.dtype != np.float32 or scores.dtype != np.float32:
            raise UserError(f"{self.source}: the network gave outputs of {locs.shape} and {scores.shape}, not SSD300's "
                            f"float32 {expected[0]} and {expected[1]}")
        if not (np.isfinite(locs).all() and np.isfinite(scores).all()):  # nan weights would count nothing, silently
            raise UserError(f"{self.source}: the network gave nan or inf outputs: its weights are damaged (export the "
                            f"checkpoint again)")
        return torch.from_numpy(locs).to(images.device), torch.from_numpy(scores).to(images.device)

    def fuse_batch_norm(self):
        return self  # folded before the export

    def extra_repr(self):
        return f"{self.runtime}, {self.metadata.get('precision')}, classes {list(self.label_map)[1:]}"


def read_metadata(text, source):
    """The export's JSON metadata, checked as a checkpoint's plain data is: a dict with a label map and model_args
    (prior_scales) that fit each other. Further keys (count_thresholds, field) detect.load_model checks."""
    if text is None:
        raise UserError(f"{source}: not an export of this project (no '{METADATA_KEY}' metadata; export.py writes it)")
    if not isinstance(text, str) or len(text) > MAX_METADATA:  # False: not a text
        raise UserError(f"{source}: its '{METADATA_KEY}' metadata is not the JSON text export.py writes")
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise UserError(f"{source}: its '{METADATA_KEY}' metadata is not valid JSON ({first_line(e)[:80]})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("model_args"), dict):
        raise UserError(f"{source}: its '{METADATA_KEY}' metadata is not export.py's (a dict with model_args expected)")
    if metadata.get("version") != METADATA_VERSION:
        raise UserError(f"{source}: metadata version {metadata.get('version')!r:.40}, not {METADATA_VERSION}; export "
                        f"the checkpoint again with this export.py")
    classes = check_label_map(metadata.get("label_map"), f"{source}: label_map")
    model_args = metadata["model_args"]
    if model_args.get("n_classes") != len(classes):
        raise UserError(f"{source}: a model of {model_args.get('n_classes')!r:.40} classes with a label map of "
                        f"{len(classes)}")
    if not valid_prior_scales(model_args.get("prior_scales")):
        raise UserError(f"{source}: its model_args' prior_scales must be six numbers in (0, 1], not "
                        f"{model_args.get('prior_scales')!r:.120}")
    return metadata


def check_shapes(inputs, outputs, metadata, source):
    """The network's declared inputs and outputs ({name: [dims]}, None for a free one, "float32" last) are SSD300's
    of the metadata's classes: images (N, 3, 300, 300) in, locs (N, P, 4) and scores (N, P, C) out."""
    priors, classes = len(create_prior_boxes(metadata["model_args"]["prior_scales"])), len(metadata["label_map"])
    expected = ({"images": [None, 3, 300, 300, "float32"]},
                {"locs": [None, priors, 4, "float32"], "scores": [None, priors, classes, "float32"]})
    if (inputs, outputs) != expected:
        raise UserError(f"{source}: a network of inputs {inputs} and outputs {outputs}, not SSD300's of {classes} "
                        f"classes (images [N, 3, 300, 300] -> locs [N, {priors}, 4], scores [N, {priors}, {classes}])")


def load_export(path):
    """An ExportedSSD300 from a .onnx (ONNX Runtime) or .xml + .bin (OpenVINO) written by export.py, checked:
    a damaged file, another network, a missing .bin, missing or unusable metadata, a missing runtime are one-line
    UserErrors naming the file. Both runtimes use torch's thread count (torch.get_num_threads: OMP_NUM_THREADS)."""
    path = str(path)
    if not path.strip():
        raise UserError("the checkpoint's name is empty: name a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such export file" if not os.path.exists(path) else
                        f"{path}: {'a folder' if os.path.isdir(path) else 'not a regular file'}, not an export file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: an empty file, not an export; write it again with export.py")
    threads = torch.get_num_threads()
    if path.lower().endswith(".onnx"):
        ort = need("onnxruntime", f"{path}: running an ONNX export")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only: they come back as exceptions
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
        metadata = read_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
        shape = lambda p: [d if isinstance(d, int) else None for d in p.shape] + [
            "float32" if p.type == "tensor(float)" else p.type]
        check_shapes({i.name: shape(i) for i in session.get_inputs()},
                     {o.name: shape(o) for o in session.get_outputs()}, metadata, path)

        def run(x):
            return session.run(["locs", "scores"], {"images": x})
        return ExportedSSD300(run, metadata, f"ONNX Runtime {ort.__version__}", path)

    ov = need("openvino", f"{path}: running an OpenVINO export")
    weights = os.path.splitext(path)[0] + ".bin"
    if not os.path.isfile(weights):
        raise UserError(f"{path}: its weights {weights} are missing (an OpenVINO export is the .xml and the .bin "
                        f"beside it)")
    core = ov.Core()
    try:
        network = core.read_model(path, weights)
    except Exception as e:
        raise UserError(f"{path}: not a readable OpenVINO model ({first_line(e)})") from None
    try:
        text = network.get_rt_info([METADATA_KEY]).astype(str) if network.has_rt_info([METADATA_KEY]) else None
    except Exception:  # not a text (a map, say)
        text = False
    metadata = read_metadata(text, path)
    if "weights_sha256" in metadata and metadata["weights_sha256"] != sha256(weights):  # older exports have none
        raise UserError(f"{path}: its weights {weights} are not the ones exported with it (a replacement stopped "
                        f"between the two files?); export the checkpoint again")
    shape = lambda p: ([d.get_length() if d.is_static else None for d in p.get_partial_shape()]
                       if p.get_partial_shape().rank.is_static else ["any rank"]) + [
        "float32" if p.get_element_type() == ov.Type.f32 else str(p.get_element_type())]
    name = lambda p: next((n for n in ("images", "locs", "scores") if n in p.get_names()), p.get_any_name()) \
        if p.get_names() else "(unnamed)"
    check_shapes({name(i): shape(i) for i in network.inputs}, {name(o): shape(o) for o in network.outputs},
                 metadata, path)
    try:  # fp32 as eager even on a CPU with bf16, where OpenVINO would otherwise run in bf16 (outputs off by 0.1)
        compiled = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                       "INFERENCE_NUM_THREADS": threads})
    except Exception as e:
        raise UserError(f"{path}: OpenVINO cannot compile it ({first_line(e)})") from None
    request = compiled.create_infer_request()
    locs, scores = compiled.output("locs"), compiled.output("scores")

    def run(x):
        request.infer({"images": x})
        return request.get_tensor(locs).data.copy(), request.get_tensor(scores).data.copy()
    return ExportedSSD300(run, metadata, f"OpenVINO {ov.__version__}", path)


def first_line(error):
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


def main(args):
    export_checkpoint(args.checkpoint, args.format, args.int8, args.output, args.data_folder, args.calibration_images)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
