"""Start a private, offline JupyterLab server for the browser test, and always stop it again.

Everything the server writes (runtime files, settings, workspaces, config) goes to a temporary
folder, nothing is fetched from the internet (no news, no update check), and the server runs with
the same Python as the tests (``sys.executable -m jupyterlab``), so its kernels see the same packages
and the environment that is passed in (e.g. ``PTCOURSE_PROFILE=smoke``).

Example::

    with running_jupyterlab(root_dir, tmp_dir, env=dict(os.environ)) as lab:
        page.goto(lab.url("lab/tree/01_autoencoders.ipynb"))
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

# what the Debian chromium package needs on headless, sandbox-less CI machines
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

# user settings: no news, no update checks, no toasts over the notebook in screenshots
_USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
}


@dataclass
class JupyterLab:
    """A running server: ``url(path)`` gives an address with the token attached."""

    process: subprocess.Popen
    base_url: str
    token: str
    log_path: Path

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 10.0):
        request = urllib.request.Request(
            self.base_url + path.lstrip("/"), method=method,
            headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(home: Path) -> dict:
    """Create the private Jupyter folders; return the environment variables that point at them."""
    dirs = {name: home / name for name in ("config", "runtime", "settings", "workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["config"] / "jupyter_lab_config.json").write_text(json.dumps({
        "LabApp": {
            "news_url": None,
            "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "expose_app_in_browser": True,
            "extension_manager": "readonly",
            "user_settings_dir": str(dirs["settings"]),
            "workspaces_dir": str(dirs["workspaces"]),
        },
    }, indent=1))
    for rel, value in _USER_SETTINGS.items():
        path = dirs["settings"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return {
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }


def _wait_until_up(lab: JupyterLab, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if lab.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {lab.process.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("api/status", timeout=5)
            with urllib.request.urlopen(lab.url("lab"), timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s:\n{lab.log_tail()}")
        time.sleep(0.5)


def _stop(lab: JupyterLab, grace: float = 20.0) -> list[int]:
    """Shut the server down (kernels first), then kill whatever is left. Returns pids that survived."""
    proc = lab.process
    try:
        family = psutil.Process(proc.pid).children(recursive=True)  # kernels run in their own sessions
    except psutil.Error:
        family = []
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            for session in lab.api("api/sessions", timeout=5) or []:
                lab.api(f"api/kernels/{session['kernel']['id']}", method="DELETE", timeout=10)
        with contextlib.suppress(Exception):
            lab.api("api/shutdown", method="POST", timeout=10)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    # the server's process group may hold helpers, and kernels have their own groups: end them by pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


@contextlib.contextmanager
def running_jupyterlab(root_dir: Path, home: Path, env: dict | None = None, log_path: Path | None = None,
                       start_timeout: float = 120.0):
    """Run ``python -m jupyterlab`` serving ``root_dir`` on a free localhost port; stop it on exit.

    ``home`` is an empty folder for the server's private config, runtime and settings files;
    ``env`` is the environment for the server and its kernels (default: this process's).
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home / "jupyterlab.log"
    env = dict(os.environ if env is None else env)
    env.update(_write_config(home))
    env.pop("JUPYTER_TOKEN", None)
    token = secrets.token_hex(24)
    for attempt in range(3):  # another process may take the free port before the server binds it
        lab = _launch(root_dir, env, token, log_path)
        try:
            _wait_until_up(lab, start_timeout)
            break
        except RuntimeError:
            _stop(lab)
            if attempt == 2 or "already in use" not in lab.log_tail():
                raise
        except BaseException:
            _stop(lab)
            raise
    try:
        yield lab
    finally:
        survivors = _stop(lab)
        if survivors:
            raise RuntimeError(f"processes left after stopping JupyterLab: {survivors}")


def _launch(root_dir: Path, env: dict, token: str, log_path: Path) -> JupyterLab:
    port = free_port()
    cmd = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.open_browser=False",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.terminals_enabled=False",
    ]
    if os.name == "posix" and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return JupyterLab(process, f"http://127.0.0.1:{port}/", token, log_path)
