"""The plumbing of the scripts, kept apart from the tutorial's helpers (utils.py), as DETR keeps its util/misc.py.

  * Errors, the command line -> UserError, run_cli (one line and an exit status, no traceback), check_torch_pair,
                                Terminated, ignore_stop_signals, StopRequest, one_line
  * Devices and processes     -> resolve_device, init_distributed, available_cpus, check_workers, bf16_is_fast,
                                bf16_choice, cpu_features, run_info, repo_relative, RunningLoss, run_python, iterate
  * Files                     -> atomic writes (save_atomic, write_json_atomic, ...), check_writable,
                                check_not_an_input, lock_folder, remove_stale_temporaries, load_checkpoint
  * Flag values               -> parse_min_score, format_min_score, parse_max_overlap

Nothing here does work at import time. run_cli first checks that torchvision works with the installed torch, and says
in one line, naming both and the command that installs a matching pair, where it does not (check_torch_pair).
"""
import contextlib
import datetime
import errno
import functools
import io
import json
import numbers
import os
import pickle
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from importlib import metadata

try:
    import fcntl  # locks an output folder against a second process (POSIX)
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm


def torch_pair_message(error):
    """One line for a torchvision that does not import with this torch (a CPU torch beside a CUDA torchvision, or builds
    of different releases): both versions, and the install command of a matching pair (from torchvision's wheel)."""
    try:
        version = metadata.version("torchvision")
        built_for = next((m[1] for r in metadata.requires("torchvision") or []
                          for m in [re.match(r"torch\s*\(?\s*(?:==|>=|~=)\s*([\w.]+)", r)] if m), None)
    except metadata.PackageNotFoundError:
        version, built_for = "(version unknown)", None
    pair = f"torch=={built_for} torchvision=={version}" if built_for else "torch torchvision"
    cause = (str(error).strip().splitlines() or [type(error).__name__])[-1][:160]
    return (f"torch {torch.__version__} and torchvision {version}{f' (which needs torch {built_for})' if built_for else ''}"
            f" do not work together ({cause}); install a matching pair: pip install --force-reinstall {pair}")


def check_torch_pair():
    """Import torchvision, which fails when it does not fit the installed torch: then exit with one line
    (torch_pair_message). run_cli calls it before a script's main; no module of the project imports torchvision
    at its top, so that a mismatch, whatever the order of the imports, is this line and not a traceback."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        raise SystemExit(f"error: {torch_pair_message(error)}") from None

# ---------------------------------------------------------------------------------------------
# Errors and the command line, devices and processes
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A problem with the user's input (a file, a flag, the data). Scripts print it without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a kill, a job scheduler's stop) raised like Ctrl-C, so that the scripts' cleanup runs for both."""


def _terminate(signum, frame):
    raise Terminated


def run_cli(main, parser):
    """Parse the command line, run `main(args)`, and turn a UserError into one line and exit status 1; Ctrl-C and
    SIGTERM end in one line too (status 130 / 143), after the script's cleanup (train.py saves first). A torchvision
    that does not fit torch is one line too (check_torch_pair), before anything else, --help included."""
    check_torch_pair()
    args = parser.parse_args()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        said = str(e) or ("terminated" if isinstance(e, Terminated) else "interrupted")  # a script may say more
        print(f"{parser.prog}: {said}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)


def ignore_stop_signals(worker_id=None):
    """DataLoader workers (worker_init_fn) leave Ctrl-C and SIGTERM, which a terminal, a container's stop or a job
    scheduler sends to the whole process group, to the main process, which stops in order. Ctrl-C is ignored; SIGTERM
    ends a worker with status 0 (killed by it, a worker was a traceback; ignoring it, the exit would hang)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def iterate(loader):
    """A DataLoader's batches, its workers shut down when the iteration ends, also by an error or close() (left to the
    garbage collector, they would hold the process for torch's 5-second join timeout)."""
    it = iter(loader)
    try:
        yield from it
    finally:
        getattr(it, "_shutdown_workers", lambda: None)()  # a single-process iterator has none


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training (train.py): noted in .signal, so that the step in progress
    finishes and the run saves, says how to resume and exits. A second signal stops at once."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (again to stop at once)", file=sys.stderr)

    def exit(self, checkpoint, iteration, where):
        """After saving `checkpoint`: say where the run stopped and how to resume it, and exit (status 130 / 143)."""
        if int(os.environ.get("RANK", 0)) == 0:
            launcher = "torchrun ... train.py" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "python train.py"
            print(f"stopped at iteration {iteration} ({where}); saved {checkpoint}. Resume with:\n"
                  f"  {launcher} --resume {checkpoint}", file=sys.stderr)
        sys.exit(128 + (self.signal or signal.SIGINT))

    def anywhere(self, world, device):
        """Whether any process got a signal: the processes of a distributed run agree (between epochs, not in a step)."""
        if world == 1:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RunningLoss:
    """The loss of every step, for a progress bar, without a host sync: on CUDA each step's loss is copied
    to pinned memory asynchronously and shown once the copy has landed (a step later); on a CPU at once."""

    def __init__(self, device):
        self.cuda, self.value, self.step = device.type == "cuda", None, 0
        if self.cuda:
            self.buffers = [torch.zeros((), pin_memory=True) for _ in range(2)]
            self.events = [None, None]

    def update(self, loss):
        if not self.cuda:
            self.value = loss.item()
            return self.value
        b = self.step % 2
        if self.events[1 - b] is not None and self.events[1 - b].query():  # the previous step's copy is here
            self.value = self.buffers[1 - b].item()
        self.buffers[b].copy_(loss.detach(), non_blocking=True)
        self.events[b] = torch.cuda.Event()
        self.events[b].record()
        self.step += 1
        return self.value


def one_line(error):
    """A UserError's message; one raised in a DataLoader worker comes back wrapped in the worker's traceback
    ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]*UserError: ", "", last.strip())
    return text


def available_cpus():
    """The CPUs this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers, flag="--workers"):
    """DataLoader worker processes: 0 (in-process) up to one per available CPU. Each worker is a copy of the
    process (hundreds of MB), so a number far beyond the CPUs adds no speed and can exhaust the memory."""
    if workers is not None and not 0 <= workers <= available_cpus():
        raise UserError(f"{flag} {workers}: give 0 (no worker processes) to {available_cpus()}, the CPUs available "
                        f"here; more add no speed and each costs memory")


def resolve_device(name):
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else is checked and returned as a torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def init_distributed(device_flag):
    """Set up torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Returns (rank, world_size, device), the device being this process's GPU under torchrun; a run
    without torchrun is a world of one and sets nothing up.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_flag)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def run_info(device):
    """Where and when a result was made: date, command, git commit, versions and device name (for results JSON)."""
    import torchvision  # here, not at the top: see check_torch_pair
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        name = f"CPU {cpu}, {torch.get_num_threads()} threads"
    command = shlex.join(["python", *(repo_relative(a) if os.path.isabs(a) else a for a in sys.argv)])  # as typed
    return {"date": datetime.date.today().isoformat(), "command": command, "commit": commit,
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "device_name": name}


def repo_relative(path):
    """A path inside the repository, relative to it, as results record paths (no machine's folders); a path
    elsewhere as given."""
    full, repo = os.path.abspath(path), os.path.dirname(os.path.abspath(__file__))
    return os.path.relpath(full, repo) if full.startswith(repo + os.sep) else str(path)


def run_python(argv, what=None, in_repo=True):
    """`python argv...` in a fresh process, in the repository (else here): its stdout. A failure is a UserError naming
    `what` (default: the command) with its exit status and last line of stderr."""
    argv, repo = [str(a) for a in argv], os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, *argv], cwd=repo if in_repo else None, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"{what or 'python ' + ' '.join(argv)} failed (exit status {done.returncode}): "
                        f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return done.stdout


def bf16_is_fast(device):
    """Whether bf16 autocast is the default on `device` (train.py, eval.py, detect.py and bench.py without --amp or
    --no-amp): bf16_choice's rule, which follows from what the device is and never from a timing, so that the same
    command on the same machine counts the same whether the machine is idle or busy."""
    return bf16_choice(device)[0]


def bf16_choice(device):
    """(bf16 autocast by default on `device`?, why, in words). The rule, and the measurements it rests on:
      * CUDA: bf16 (tensor cores).
      * a CPU with AMX (amx_bf16: Intel Xeon of the 4th generation and later): bf16. A 2-core Xeon with AMX ran
        SSD300 2.3x (batch 1) to 2.6x (batch 8) as fast per window in bf16 as in fp32 (2026-12-05).
      * an AMD CPU with AVX512-BF16 (Zen 4 and later): bf16. A 2-core AMD EPYC trained about 2x and counted 1.7x
        as fast in bf16 (11.1 against 6.5 images/s through detect.py; 2026-11-26 and later).
      * any other CPU: fp32. An Intel CPU with AVX512-BF16 but no AMX ran bf16 slower than fp32 (a 2-core Xeon of
        2026-11-27: eval.py 33.2 s against 24.7 s, a convolution 1.75x slower); without AVX512-BF16 bf16 is emulated.
    The CPU's features are read from /proc/cpuinfo (cpu_features), never timed: a timing at start-up chose fp32
    on 2 of 12 start-ups of a busy machine, and the counts then differed."""
    if device.type == "cuda":
        return True, "CUDA"
    vendor, flags = cpu_features()
    if "amx_bf16" in flags:
        fast, why = True, "the CPU has AMX (amx_bf16)"
    elif "avx512_bf16" in flags and vendor == "AuthenticAMD":
        fast, why = True, "an AMD CPU with AVX512-BF16"
    elif "avx512_bf16" in flags:
        fast, why = False, "AVX512-BF16 without AMX: bf16 was slower than fp32 on such a CPU"
    else:
        fast, why = False, "the CPU has neither AMX nor AVX512-BF16"
    try:
        kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        kernels = False
    if fast and not kernels:  # a torch built without oneDNN's bf16
        return False, "this torch has no bf16 kernels for the CPU"
    return fast, why


@functools.lru_cache(maxsize=None)
def cpu_features():
    """(vendor, flags) of this machine's CPU: /proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD") and flags
    ("avx512_bf16", "amx_bf16", ...) on Linux; elsewhere no vendor, and the bf16 features torch reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    vendor, flags = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M), re.search(r"^flags\s*:(.*)$", text, re.M)
    if flags:
        return (vendor[1] if vendor else ""), frozenset(flags[1].split())
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}  # torch's own
    return "", frozenset(flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)())


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and safe checkpoint loading
# ---------------------------------------------------------------------------------------------

def _atomic(path, write):
    """Call write(tmp_path) and move the result onto `path`: an interrupted write never destroys `path`.

    A write the file system refuses (full disk, no permission, a file where a folder should be) is a UserError
    naming `path`; the temporary file is removed, and one that a killed process left is removed by
    remove_stale_temporaries."""
    tmp = f"{path}.{os.getpid()}.tmp"  # same folder, so os.replace is atomic; created with the usual permissions
    try:
        _refuse_special(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the earlier file is kept" if os.path.exists(path) else "nothing written"
            raise UserError(f"{path}: cannot write ({e.strerror or e}); {kept}") from None
        raise


def _refuse_special(path, folder_ok=True):
    """OSError if `path` exists and is neither a regular file nor a folder (a device such as /dev/full, a pipe,
    a socket, or a link to one): os.replace would put a regular file in its place. folder_ok=False: a folder
    is refused too (where a file is to go)."""
    if not folder_ok and os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder is in the way")
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket); name a file")


def check_writable(path, flag, folder=False, create=True):
    """Before any long work: check that the output `path` (a file, or a folder if `folder`) can be written,
    creating its folder (create=True) or, without creating anything, in the nearest folder above it that
    exists. UserError naming the flag and path otherwise (read-only, a file in the way, ...)."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty: name a {'folder' if folder else 'file'}")
    where = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    try:
        if folder and os.path.islink(path) and not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "a link to nothing; name a folder")
        _refuse_special(path, folder_ok=folder)
        existing = where
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        if create:
            os.makedirs(where, exist_ok=True)
        else:
            where = existing
        fd, probe = tempfile.mkstemp(dir=where, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def check_not_an_input(path, flag, checkpoint=None, data_folder=None, others=()):
    """UserError if the output `path` is the checkpoint (an OpenVINO .xml's .bin too), one of the lists (of
    data_folder) or one of the `others` that this run reads: writing there would destroy it."""
    lists = [f"{split}_{kind}.json" for split in ("TRAIN", "TEST") for kind in ("images", "objects")]
    lists.append("label_map.json")
    inputs = [checkpoint] + ([os.path.join(data_folder, name) for name in lists] if data_folder else []) + list(others)
    if checkpoint and str(checkpoint).lower().endswith(".xml"):
        inputs.append(os.path.splitext(checkpoint)[0] + ".bin")
    for p in inputs:
        if p and os.path.isfile(path) and os.path.isfile(p) and os.path.samefile(path, p):
            raise UserError(f"{flag} {path}: that is {p}, which this run reads; writing there would destroy it")


def lock_folder(folder, message):
    """Lock `folder` against a second process that writes there (POSIX flock, released when this process ends,
    however it ends); a UserError saying `message` if another holds it. Returns the file descriptor to close."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"{folder}: cannot open the folder to lock it ({e.strerror or e})") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(message) from None
    return fd


def remove_stale_temporaries(folder, names):
    """Remove the temporary files (<name>.<pid>.tmp, see _atomic) that a killed process left beside `names` in
    `folder`. Call it only while no other process writes there (train.py holds a lock on its folder)."""
    pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + r")\.\d+\.tmp")
    for entry in os.listdir(folder):
        if pattern.fullmatch(entry):
            os.remove(os.path.join(folder, entry))


def save_atomic(obj, path):
    """torch.save to memory, written to a temporary file in the same folder, then os.replace onto `path`."""
    buffer = io.BytesIO()  # written by Python, which raises on a full disk (torch's own writer fails obscurely)
    torch.save(obj, buffer)
    write_bytes_atomic(buffer.getbuffer(), path)


def write_bytes_atomic(data, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic(path, write)


def write_text_atomic(text, path):
    write_bytes_atomic(text.encode("utf-8"), path)


def write_json_atomic(obj, path, indent=None):
    write_text_atomic(json.dumps(obj, indent=indent) + "\n", path)


def save_image_atomic(image, path, **params):
    """PIL image.save(path, **params) to a temporary file, then os.replace onto `path` (format from its extension)."""
    buffer = io.BytesIO()  # PIL's encoders ignore a short write (a full disk): Python's file raises
    try:
        image.save(buffer, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower()), **params)
    except (OSError, ValueError) as e:  # an image the format cannot hold (a JPEG is at most 65,535 px a side)
        raise UserError(f"{path}: cannot encode the image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    write_bytes_atomic(buffer.getbuffer(), path)


@contextlib.contextmanager
def stop_signals_held():
    """Ctrl-C and SIGTERM that arrive inside the block take effect when it ends (POSIX; elsewhere, at once): for
    moves of several files into place (microseconds) that must not stop half done."""
    held = None
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def write_json_files_atomic(files):
    """Write several JSON files that belong together ({path: obj}): all to temporary files first, then each moved
    into place, so that a failed write (a full disk) leaves the earlier set whole, never half old, half new."""
    written, path = [], None
    try:
        for path in files:
            _refuse_special(path, folder_ok=False)
        for path, obj in files.items():
            tmp = f"{path}.{os.getpid()}.tmp"
            written.append((tmp, path))
            with open(tmp, "w") as f:
                f.write(json.dumps(obj) + "\n")
        with stop_signals_held():  # Ctrl-C or SIGTERM between two moves would leave a set half old, half new
            for tmp, path in written:
                os.replace(tmp, path)
    except BaseException as e:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({e.strerror or e}); the earlier files are kept") from None
        raise


def all_finite(tensors):
    """Whether every floating-point tensor among `tensors` (a state_dict's values, say) holds no nan or inf; other
    values are passed over."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def load_checkpoint(path):
    """Load a checkpoint written by train.py: tensors and plain data only.

    `weights_only=True` means unpickling can build tensors, dicts, lists, numbers and strings
    and nothing else, so opening a checkpoint never runs code. A file that needs more is refused.
    """
    if not str(path).strip():
        raise UserError("the checkpoint's name is empty: name a checkpoint file")
    if os.path.isdir(path):
        raise UserError(f"{path}: a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file" if not os.path.exists(path) else
                        f"{path}: not a regular file, not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a checkpoint file (train.py writes zip archives with torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message
        what = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        raise UserError(f"{path}: refused: it holds pickled objects, not only tensors and plain data, and "
                        f"loading it could run code{' (' + what[:160] + ')' if what else ''}") from None
    except Exception as e:  # truncated or damaged archive, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this project (expected a dict with 'model' and 'model_args')")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Flag values
# ---------------------------------------------------------------------------------------------

MIN_SCORE_FORMS = "0.5 (every class), RBC=0.35,WBC=0.25 (those named) or 0.35,0.25,0.3 (one per class, in order)"


def parse_min_score(value, names=None, source="--min-score", default=None):
    """The min_score of each class: a float (one for all) or a list of floats in label order, each in [0, 1).

    value: a number, or numbers one per class in label order (the Python API's; a checkpoint's record); or a command
    line's text, one word that cannot swallow the arguments after it: "0.5" (every class), "RBC=0.35,WBC=0.25"
    (the classes named; the others keep `default`, a float or a list in label order) or "0.35,0.25,0.3" (one per
    class, in label order). names: the class names in label order; None checks the form and the numbers only,
    before the model is known. A bad value is a UserError naming `source`.
    """
    if isinstance(value, str):
        pairs = [item.rsplit("=", 1) if "=" in item else [None, item] for item in value.split(",")]
        try:
            pairs = [(None if name is None else name.strip(), float(number)) for name, number in pairs]
        except ValueError:
            raise UserError(f"{source} {value!r}: give {MIN_SCORE_FORMS}") from None
    else:
        pairs = [(None, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    values = [v for _, v in pairs]
    if not all(0 <= v < 1 for v in values):  # also refuses nan
        raise UserError(f"{source} must lie in [0, 1), not {' '.join(map(str, values))}")
    named = [name for name, _ in pairs if name is not None]
    if named and len(named) < len(pairs):
        raise UserError(f"{source} {value!r}: name every value's class or none; give {MIN_SCORE_FORMS}")
    if names is None:
        return None
    if not named:
        if len(values) not in (1, len(names)):
            raise UserError(f"{source}: give one value or {len(names)}, one per class ({', '.join(names)}), not "
                            f"{len(values)}")
        return float(values[0]) if len(values) == 1 else [float(v) for v in values]
    for i, name in enumerate(named):
        if name not in names:
            raise UserError(f"{source}: the model has no class {name!r} (its classes: {', '.join(names)})")
        if name in named[:i]:
            raise UserError(f"{source}: {name!r} given twice")
    if default is None and len(named) < len(names):
        raise UserError(f"{source}: give a value for every class ({', '.join(names)})")
    base = default if isinstance(default, list) else [default] * len(names)
    given = dict(pairs)
    return [float(given.get(name, b)) for name, b in zip(names, base)]


def format_min_score(min_score, names):
    """min_score as --min-score takes it: 0.5, or RBC=0.35,WBC=0.25,Platelets=0.3 (names: the classes in label order)."""
    if isinstance(min_score, float):
        return f"{min_score:g}"
    return ",".join(f"{name}={v:g}" for name, v in zip(names, min_score))


def parse_max_overlap(value, source="--max-overlap"):
    """The IoU above which two boxes of a class are one cell (NMS): a number in (0, 1]; checked (nan refused)."""
    if not (isinstance(value, numbers.Real) and 0 < value <= 1):  # NumPy's numbers too
        raise UserError(f"{source} must be in (0, 1], not {value!r}")
    return float(value)
