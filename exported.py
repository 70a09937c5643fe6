"""Running an export of export.py (.onnx by ONNX Runtime, .xml + .bin by OpenVINO) in SSD300's place.

    from detect import load_model
    model = load_model("weights/ssd300_bccd-int8.xml")   # an ExportedSSD300: detect.py, eval.py and the API take it

What an export holds is the network alone, from normalized images (N, 3, 300, 300) to its raw (locs, scores), and,
as JSON metadata, what detect.load_model needs beside it (the label map, the counting thresholds, the training field,
the prior scales). ExportedSSD300 runs the network in its runtime and keeps SSD300's priors, decoding and NMS, so that
the paths differ only in the network. Every file is checked as it is loaded: a damaged file, another network, a
missing .bin, missing or unusable metadata, or a missing runtime is one line naming the file. export.py writes them.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn

from misc import UserError
from model import SSD300, create_prior_boxes, valid_prior_scales
from utils import check_label_map

METADATA_KEY = "ssd300"  # ONNX metadata_props key / OpenVINO rt_info key of the JSON metadata
METADATA_VERSION = 1
MAX_METADATA = 1 << 20  # bytes: the label map and provenance take a few KB; a larger text is not ours
INSTALL = "pip install -r requirements-export.txt"


def need(module, what):
    """Import an optional runtime, or a one-line UserError naming the pip command."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{what} needs the package {module}, which is not installed: {INSTALL}") from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
