"""Chapters published with their outputs, and the proof that those outputs came from the code beside them.

    python -m ptcourse run --record chapters/05_knowledge_distillation.ipynb   # cpu profile on a CPU machine

:func:`record` executes a chapter in a fresh kernel, as ``python -m ptcourse run`` does, and then
writes the executed notebook back over the chapter, with its outputs, and the run's record into
``results/``. The two are tied by one hash, :func:`code_sha256`, of the notebook's code cells: the
record stores it as ``code_sha256``, and the notebook's metadata names the run
(``metadata.ptcourse.record``: chapter, the record's ``recorded`` time, the hash, the profile).
``tests/test_published.py`` fails when a code cell changed after that run (prose may change freely)
or when the stored outputs are not from the run that made the record.

The outputs are made for reading, on GitHub, in JupyterLab and on the course's website:

* figures are PNG at :data:`FIGURE_DPI` dots per inch (the kernel's inline backend is set so),
  re-encoded losslessly as small as they go (:func:`smaller_png`);
* progress bars are text, and only their last state is kept (``tqdm.auto`` would make widgets,
  which show nothing without a running kernel);
* a widget (a slider with its picture) is replaced by what it showed when the cell ran, with a line
  naming the controls' values;
* folders of the machine that made the run are written in words (``~``, ``<tmp>``, ``$PTCOURSE_DATA``,
  ``<site-packages>``); any other absolute path fails the run (:func:`output_problems`);
* no error outputs; the whole notebook within :data:`SIZE_BUDGET` bytes.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import html
import json
import os
import re
import site
import sys
import sysconfig
import tempfile
import time
from datetime import datetime
from pathlib import Path

FIGURE_DPI = 80                  # a 10 x 3.2 inch figure is 800 x 256 pixels
SIZE_BUDGET = 2_000_000          # bytes per chapter notebook, outputs included
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# the install line of the setup cell names the repository and the release (tools/meta.py); a fork or a
# release changes it, and outside Colab the cell installs nothing, so the hash leaves both out
_PIP_SPEC = re.compile(r"ptcourse @ git\+[^\s\"']+")


# ----------------------------------------------------------------------------- provenance
def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_sha256(nb) -> str:
    """SHA-256 of a notebook's code cells, in order: their sources only (no outputs, counts or metadata).

    Normalised so that only a change a kernel would see counts: line endings, trailing spaces and
    blank lines at a cell's ends are ignored, and so is the release named in the setup cell's
    install line. ``nb`` is a notebook dict (``json.load``/``nbformat.read``) or a path.

    Example:
        >>> a = {"cells": [{"cell_type": "code", "source": "x = 1\\n"}, {"cell_type": "markdown", "source": "hi"}]}
        >>> b = {"cells": [{"cell_type": "code", "source": ["x = 1  "]}, {"cell_type": "markdown", "source": "bye"}]}
        >>> code_sha256(a) == code_sha256(b)
        True
    """
    if not isinstance(nb, dict):
        nb = json.loads(Path(nb).read_text(encoding="utf-8"))
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line.rstrip() for line in _source(cell).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        cells.append(_PIP_SPEC.sub("ptcourse @ git+<repository>@<release>", "\n".join(lines).strip("\n")))
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode("utf-8")).hexdigest()


def carries_outputs(nb) -> bool:
    """Whether a notebook holds outputs, execution counts or the metadata of a recorded run."""
    return bool(nb.get("metadata", {}).get("ptcourse", {}).get("record")) or any(
        cell.get("outputs") or cell.get("execution_count") is not None
        for cell in nb["cells"] if cell["cell_type"] == "code")


def provenance_problems(nb, record: dict | None, chapter: str) -> list[str]:
    """Why a notebook's outputs cannot be trusted to come from the run that made ``record`` (empty: they can).

    The code cells' hash must equal the record's ``code_sha256`` and the notebook's own, the
    notebook must name the record's run (``recorded``, ``profile``), and every code cell must have run.
    """
    meta = nb.get("metadata", {}).get("ptcourse", {}).get("record")
    if not meta:
        return [f"{chapter}: carries outputs but no metadata.ptcourse.record: record it with "
                f"`python -m ptcourse run --record chapters/{chapter}.ipynb`"]
    if record is None:
        return [f"{chapter}: carries outputs but results/{chapter}.json does not exist"]
    now = code_sha256(nb)
    problems = []
    if record.get("code_sha256") != now:
        problems.append(f"{chapter}: its code cells changed since the run recorded in results/{chapter}.json "
                        f"(code_sha256 {str(record.get('code_sha256'))[:12]}… there, {now[:12]}… now): rerun "
                        f"`python -m ptcourse run --record chapters/{chapter}.ipynb`")
    if meta.get("code_sha256") != now:
        problems.append(f"{chapter}: its code cells changed since its outputs were made "
                        f"(metadata code_sha256 {str(meta.get('code_sha256'))[:12]}…, now {now[:12]}…)")
    for key in ("chapter", "recorded", "profile"):
        if meta.get(key) != record.get(key):
            problems.append(f"{chapter}: the outputs are from another run than the record: metadata {key} "
                            f"{meta.get(key)!r}, record {record.get(key)!r}")
    unrun = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and c.get("execution_count") is None]
    if unrun:
        problems.append(f"{chapter}: code cells {unrun} did not run in the recorded run")
    return problems


# ----------------------------------------------------------------------------- readable outputs
def _texts(output):
    """(mime type, text) pairs of one output: stream text, text/* data, tracebacks."""
    if output.get("output_type") == "stream":
        yield "text/plain", _source({"source": output.get("text", "")})
    elif output.get("output_type") == "error":
        yield "text/plain", "\n".join(output.get("traceback", []))
    for mime, value in (output.get("data") or {}).items():
        if mime.startswith("text/"):
            yield mime, _source({"source": value})
        elif mime.endswith("json"):
            yield mime, json.dumps(value)


# an absolute path of two or more parts (not the end of a URL or of a relative path), or a Windows one
_ABSOLUTE = re.compile(r"(?<![\w.~:/$<>@-])/[A-Za-z_][\w.-]*(?:/[\w.-]+)+|\b[A-Za-z]:\\[\w.\\-]+")


# folders every Unix has, which say nothing about a user or a run (a library's warning may name /usr/local)
_SYSTEM = ("/usr/", "/opt/", "/etc/", "/lib/", "/lib64/", "/bin/", "/sbin/", "/dev/", "/proc/", "/sys/")


def machine_paths(text: str) -> list[str]:
    """Absolute paths, the home folder, the temporary folder and the user name (as a folder) found in
    ``text``; the system's own folders (``/usr``, ``/opt``, ...) are not counted.

    Example:
        >>> machine_paths("saved to /home/ada/ptcourse/x.pt; see ~/x, ../results/01.json and /usr/local/cuda")
        ['/home/ada/ptcourse/x.pt']
    """
    found = [m.group(0) for m in _ABSOLUTE.finditer(text) if not (m.group(0) + "/").startswith(_SYSTEM)]
    user = getpass.getuser()
    local = [str(Path.home()), tempfile.gettempdir()] + ([f"/{user}/", f"\\{user}\\"] if len(user) > 2 else [])
    found += [p for p in local if len(p) > 1 and p in text and not any(p in f for f in found)]
    return found


def output_problems(nb, size: int | None = None) -> list[str]:
    """What makes a notebook's outputs unfit to publish: errors, widgets, images other than PNG, inline
    data images in HTML, machine paths, and a size (in bytes, when given) over :data:`SIZE_BUDGET`."""
    problems = []
    if size is not None and size > SIZE_BUDGET:
        problems.append(f"{size / 1e6:.2f} MB, over the budget of {SIZE_BUDGET / 1e6:.0f} MB: fewer or "
                        "smaller figures, or shorter printouts")
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            kind = output.get("output_type")
            if kind == "error":
                problems.append(f"cell {i}: an error output ({output.get('ename')}: {output.get('evalue')})")
            data = output.get("data") or {}
            if WIDGET_VIEW in data:
                problems.append(f"cell {i}: a widget, which shows nothing without a running kernel")
            for mime in data:
                if mime.startswith("image/") and mime != "image/png":
                    problems.append(f"cell {i}: a {mime} image (figures are PNG)")
            if "data:image" in str(data.get("text/html", "")):
                problems.append(f"cell {i}: an image inlined in HTML (show figures as PNG outputs)")
            for _, text in _texts(output):
                for path in machine_paths(text):
                    problems.append(f"cell {i}: a path of the machine that ran it: {path!r}")
    return problems


# ----------------------------------------------------------------------------- making them readable
def _scrub_rules(root: Path) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) for this machine's folders, longest first, so the most specific wins."""
    named = {os.environ[v]: f"${v}" for v in ("PTCOURSE_DATA", "HF_HUB_CACHE", "HF_HOME", "TORCH_HOME")
             if os.environ.get(v)}
    for folder in [*site.getsitepackages(), site.getusersitepackages(),
                   sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]:
        named.setdefault(folder, "<site-packages>")
    named.setdefault(sysconfig.get_path("stdlib"), f"<python{sys.version_info[0]}.{sys.version_info[1]}>")
    named.setdefault(str(root), "<course>")
    named.setdefault(tempfile.gettempdir(), "<tmp>")
    named.setdefault(str(Path.home()), "~")
    pairs = {}
    for path, word in named.items():
        for variant in {str(Path(path)), os.path.realpath(path)}:
            if len(variant) > 1:
                pairs.setdefault(variant, word)
    return [(re.compile(re.escape(p) + r"(?![\w-])"), w) for p, w in sorted(pairs.items(), key=lambda kv: -len(kv[0]))]


def _scrub(text: str, rules, mime: str = "text/plain") -> str:
    for pattern, word in rules:
        text = pattern.sub((html.escape(word) if mime == "text/html" else word).replace("\\", "\\\\"), text)
    return text


_BACKSPACE = re.compile("[^\\n]\\x08")


def _last_state(text: str) -> str:
    """Terminal text as it ends up on screen: a carriage return overwrites its line (progress bars),
    a backspace the character before it; lines left holding only the spaces that erased a bar go."""
    while _BACKSPACE.search(text):
        text = _BACKSPACE.sub("", text)
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(line.rstrip() for line in lines if line == "" or line.strip())


def _merge_streams(outputs: list) -> list:
    """Consecutive stream outputs of one name (stdout, stderr) as one, in its last state."""
    merged = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and last is not None and last.get("output_type") == "stream"
                and last["name"] == output["name"]):
            last["text"] = _source({"source": last["text"]}) + _source({"source": output["text"]})
        else:
            merged.append(output)
    for output in merged:
        if output.get("output_type") == "stream":
            output["text"] = _last_state(_source({"source": output["text"]}))
    return [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]


def smaller_png(data: str) -> str:
    """A base64 PNG re-encoded losslessly and smaller where it can be: opaque RGBA as RGB, at most 256
    colours as a palette (a grey-scale image grid shrinks by about 40 %), maximum compression.

    Example:
        >>> import io, numpy as np; from PIL import Image
        >>> grey = np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8)
        >>> buffer = io.BytesIO(); Image.fromarray(np.dstack([grey, grey, grey, grey * 0 + 255])).save(buffer, "PNG")
        >>> png = base64.b64encode(buffer.getvalue()).decode()
        >>> len(smaller_png(png)) < 0.5 * len(png)
        True
    """
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    pixels = np.asarray(image.convert("RGBA"))
    if pixels[..., 3].min() < 255:
        return data                                    # transparency: leave it as it is
    colours, index = np.unique(pixels[..., :3].reshape(-1, 3), axis=0, return_inverse=True)
    if len(colours) <= 256:
        image = Image.fromarray(index.reshape(pixels.shape[:2]).astype(np.uint8), mode="P")
        image.putpalette(colours.astype(np.uint8).ravel().tolist())
    else:
        image = Image.fromarray(pixels[..., :3], mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    smaller = base64.b64encode(buffer.getvalue()).decode("ascii")
    return smaller if len(smaller) < len(data) else data


def _control_value(state: dict):
    if "_options_labels" in state and "index" in state:          # Dropdown, RadioButtons, ...
        index = state["index"]
        return state["_options_labels"][index] if isinstance(index, int) else index
    value = state.get("value")
    return f"{value:.4g}" if isinstance(value, float) else value


def _widget_snapshot(model_id: str, states: dict, buffers: dict) -> list[dict]:
    """What a widget showed when its cell ran, as ordinary outputs: the outputs of its Output widgets,
    its images as PNG, and one line naming its controls' values."""
    controls, shown = [], []

    def walk(mid):
        state = states.get(mid, {})
        name = state.get("_model_name", "")
        if name == "OutputModel":
            shown.extend(state.get("outputs", []))
        elif name == "ImageModel" and state.get("format", "png") == "png" and ("value",) in buffers.get(mid, {}):
            shown.append({"output_type": "display_data", "metadata": {},
                          "data": {"image/png": buffers[mid][("value",)]["data"], "text/plain": "<image>"}})
        elif state.get("description") and ("value" in state or "index" in state):
            controls.append(f"{state['description']} = {_control_value(state)}")
        for child in state.get("children", []):
            walk(child.replace("IPY_MODEL_", "", 1))

    walk(model_id)
    note = ("Interactive when you run the notebook" + (": shown here at " + ", ".join(controls) if controls else "")
            + ".")
    return [{"output_type": "display_data", "metadata": {},
             "data": {"text/markdown": f"*{note}*", "text/plain": note}}] + shown


def readable(nb, states: dict, buffers: dict, root: Path) -> None:
    """Make an executed notebook's outputs fit to publish, in place (see the module's docstring)."""
    from nbformat import from_dict

    rules = _scrub_rules(Path(root))
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell.get("metadata", {}).pop("execution", None)
        outputs = []
        for output in cell.get("outputs", []):
            view = (output.get("data") or {}).get(WIDGET_VIEW)
            outputs += _widget_snapshot(view["model_id"], states, buffers) if view else [output]
        outputs = _merge_streams(outputs)
        for output in outputs:
            if output.get("output_type") == "stream":
                output["text"] = _scrub(output["text"], rules)
            for mime, value in (output.get("data") or {}).items():
                if mime.startswith("text/"):
                    output["data"][mime] = _scrub(_source({"source": value}), rules, mime)
                elif mime == "image/png":
                    output["data"][mime] = smaller_png(_source({"source": value}).replace("\n", ""))
        cell["outputs"] = [from_dict(o) for o in outputs]


# ----------------------------------------------------------------------------- the kernel of a recorded run
def record_kernel(ipython_dir) -> None:
    """Configure the IPython profile in ``ipython_dir`` for a recorded run: PNG figures at
    :data:`FIGURE_DPI`, and ``tqdm.auto`` progress bars as text on stdout."""
    profile = Path(ipython_dir) / "profile_default"
    (profile / "startup").mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text(
        "# written by ptcourse.tools.published: the figures of a recorded run\n"
        "c.InlineBackend.figure_formats = {'png'}\n"
        f"c.InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', 'dpi': {FIGURE_DPI}}}\n")
    (profile / "startup" / "10-text-progress.py").write_text(
        "# written by ptcourse.tools.published: progress bars as text lines in a recorded run (a widget\n"
        "# bar shows nothing without a running kernel); the runner keeps each bar's last state\n"
        "import tqdm.auto as _auto, tqdm.autonotebook as _autonotebook, tqdm.std as _std\n"
        "class _TextBar(_std.tqdm):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        import sys\n"
        "        kwargs.setdefault('file', sys.stdout)\n"
        "        kwargs.setdefault('mininterval', 1.0)\n"
        "        super().__init__(*args, **kwargs)\n"
        "_auto.tqdm = _autonotebook.tqdm = _TextBar\n"
        "_auto.trange = _autonotebook.trange = lambda *args, **kwargs: _TextBar(range(*args), **kwargs)\n"
        "del _auto, _autonotebook, _std\n")


def write_notebook(nb, path) -> None:
    """Write ``nb`` in nbformat's layout (sorted keys, one line per list item) plus a final newline."""
    import nbformat
    Path(path).write_text(nbformat.writes(nbformat.from_dict(nb)) + "\n", encoding="utf-8")


class RecordError(RuntimeError):
    """A recorded run that failed or whose outputs are unfit to publish; nothing was written."""


def record(path, profile_name: str, root=None, out_dir="runs", timeout: int = 1800, echo=print) -> dict:
    """Run a chapter in a fresh kernel and publish it: its outputs written back into the notebook, its
    record into ``root/results/``, both carrying :func:`code_sha256`. Returns the record.

    On any failure (an error in a cell, no ``ptcourse.report`` call, unreadable outputs, the notebook
    edited during the run) the chapter and the old record are left as they were, the executed copy
    goes to ``out_dir`` for a look, and :class:`RecordError` says what happened.

    Example (a terminal, the course folder; takes the chapter's run time):
        >>> record("chapters/05_knowledge_distillation.ipynb", "cpu")    # doctest: +SKIP
    """
    import nbformat

    from ..files import atomic_write
    from ..runtime import pinned_cpu_kernels
    from .lab import execute, kernel_crash_logs

    path = Path(path).resolve()
    root = Path(root).resolve() if root else path.parent.parent
    chapter = path.stem
    if path.parent != root / "chapters":
        raise RecordError(f"{path}: only the chapters in {root / 'chapters'} are published with their outputs")
    before = path.read_bytes()
    nb = nbformat.reads(before.decode("utf-8"), as_version=4)
    code_hash = code_sha256(nb)
    record_path = root / "results" / f"{chapter}.json"
    old_record = record_path.read_bytes() if record_path.exists() else None
    out_dir = Path(out_dir).resolve()
    crash_dir = out_dir / "kernel-logs"
    env_before = dict(os.environ)
    os.environ.update(
        PTCOURSE_PROFILE=profile_name,
        # relative to the kernel's folder (the notebook's), so report() prints ../results/<chapter>.json
        PTCOURSE_RESULTS=os.path.relpath(record_path.parent, path.parent),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        # the same bits on another x86 machine with the same thread count (runtime.PINNED_CPU_KERNELS)
        **pinned_cpu_kernels(),
        **kernel_crash_logs(crash_dir))
    record_kernel(os.environ["IPYTHONDIR"])
    echo(f"record {path.relative_to(root)} ({profile_name}) ...")
    t0 = time.time()
    try:
        error, client = execute(nb, path, timeout, crash_dir, store_widget_state=True, record_timing=False)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    wall = time.time() - t0
    copy = out_dir / "recorded" / path.name
    copy.parent.mkdir(parents=True, exist_ok=True)

    def give_up(reason):
        write_notebook(nb, copy)
        if old_record is None:
            record_path.unlink(missing_ok=True)
        else:
            record_path.write_bytes(old_record)
        raise RecordError(f"{path.name}: {reason}\n(nothing published; the executed copy is {copy})")

    if error:
        give_up(error)
    rec = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else None
    if rec is None or datetime.fromisoformat(rec["recorded"]).timestamp() < int(t0):
        give_up(f"the run wrote no record: the notebook must call ptcourse.report({chapter!r}, ...)")
    if rec["chapter"] != chapter:
        give_up(f"the record names chapter {rec['chapter']!r}, the notebook is {chapter!r}")
    readable(nb, client.widget_state, client.widget_buffers, root)
    nb.metadata = nbformat.reads(before.decode("utf-8"), as_version=4).metadata
    nb.metadata["ptcourse"] = {"record": {"chapter": chapter, "recorded": rec["recorded"], "code_sha256": code_hash,
                                          "profile": rec["profile"]}}
    text = nbformat.writes(nb) + "\n"
    problems = output_problems(nb, size=len(text.encode("utf-8")))
    if problems:
        give_up("outputs unfit to publish:\n  " + "\n  ".join(problems))
    if path.read_bytes() != before:
        give_up("the notebook was edited while it ran; record it again")
    rec["code_sha256"] = code_hash
    atomic_write(record_path, lambda f: f.write(json.dumps(rec, indent=2).encode("utf-8")))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    echo(f"       published in {wall / 60:.1f} min: {path.relative_to(root)} ({len(text.encode()) / 1e6:.2f} MB) "
         f"and {record_path.relative_to(root)} (code_sha256 {code_hash[:12]}…)")
    return rec
