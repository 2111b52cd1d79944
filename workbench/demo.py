"""Open JupyterLab on the quickstart notebook with the bundled model (the README's main job).

`workbench demo` starts JupyterLab on 127.0.0.1 only, on a random free port with a fresh token, and prints the URL;
`--headless` executes the quickstart with nbclient instead and writes its trace store, for machines without a
browser; `--summary` prints a prompt's routing and KV-cache summary in the terminal.

Design choices:
- The notebooks run in a work dir (default ./workbench-demo), never in the repo's examples/: a notebook run in Lab
  saves its outputs into the file and writes a trace store beside it, while the examples stay output-free in git
  (a test checks that). Notebooks already in the work dir are left alone, so a user's edits survive a second run.
- The token reaches the server through JUPYTER_TOKEN, not argv, so other local users cannot read it from `ps`.
- The server runs in its own session: Ctrl-C in the terminal reaches only this process, which then stops the server
  with SIGTERM (jupyter_server's clean shutdown: kernels first) and kills it only if it has not exited in time.
- The URL is printed only once /api/status answers with the token, so it works when the user sees it.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from workbench.config import ModelConfig
from workbench.loader import load_model
from workbench.model.costs import kv_bytes_per_token

DEFAULT_PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
QUICKSTART = "quickstart.ipynb"
HEADLESS_OUTPUT = "quickstart-executed.ipynb"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0  # Lab starts in 6-9 s on an idle 2-core machine; a loaded one takes several times that
STOP_TIMEOUT_S = 15.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--headless", action="store_true",
                      help="execute the quickstart notebook with nbclient and write its trace store; no server")
    mode.add_argument("--summary", action="store_true",
                      help="print a prompt's routing and KV-cache summary in the terminal; no notebook")
    p.add_argument("--workdir", type=Path, default=Path("workbench-demo"),
                   help="where the notebooks are copied and run (default: ./workbench-demo)")
    p.add_argument("--port", type=int, default=None, help="port for JupyterLab (default: a random free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser (none is opened without a display)")
    p.add_argument("--model", default=None, help="--summary: 'default', a preset name, or a checkpoint directory")
    p.add_argument("--prompt", default=None, help="--summary: the text to run")
    p.add_argument("--new-tokens", type=int, default=None, help="--summary: greedy tokens to generate (default 16)")


def run(args: argparse.Namespace) -> int:
    summary_only = [f"--{name.replace('_', '-')}" for name in ("model", "prompt", "new_tokens")
                    if getattr(args, name) is not None]
    if args.summary:
        return print_summary(args.model or "default", args.prompt if args.prompt is not None else DEFAULT_PROMPT,
                             args.new_tokens if args.new_tokens is not None else 16)
    if summary_only:  # the notebooks load the bundled model themselves; silently ignoring these would mislead
        raise ValueError(f"{', '.join(summary_only)} only apply with --summary")
    try:
        if args.headless:
            notebook, store = run_headless(args.workdir)
            print(f"executed notebook: {notebook}")
            print(f"trace store:       {store}  (open it with workbench.open_trace({str(store)!r}))")
            return 0
        return serve_lab(args.workdir, port=args.port, open_browser=not args.no_browser)
    except RuntimeError as e:  # the server or the notebook failed: say where to look, no traceback
        print(f"workbench demo: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- the notebooks
def examples_dir() -> Path:
    """The example notebooks: shipped inside the package (wheel) or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parent / "examples"):
        if (candidate / QUICKSTART).is_file():
            return candidate
    raise FileNotFoundError(f"the example notebooks are not installed: no {QUICKSTART} in {here / 'examples'} "
                            f"or {here.parent / 'examples'}")


def prepare_workdir(workdir: Path, examples: Path | None = None) -> list[Path]:
    """Copy the example notebooks into `workdir` where absent; returns the notebooks copied this time."""
    examples = examples if examples is not None else examples_dir()
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(examples.glob("*.ipynb")):
        dest = workdir / src.name
        if not dest.exists():
            shutil.copyfile(src, dest)
            copied.append(dest)
    return copied


def run_headless(workdir: Path, *, timeout_s: int = 600) -> tuple[Path, Path]:
    """Execute the pristine quickstart with its working directory in `workdir`; returns (executed notebook, store).

    The executed copy goes to quickstart-executed.ipynb (replaced on each run: it is this command's output), so the
    user's own quickstart.ipynb in the work dir is never touched.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    src = examples_dir() / QUICKSTART
    prepare_workdir(workdir)
    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir.resolve())}})
    out = workdir / HEADLESS_OUTPUT
    try:
        client.execute()
    except CellExecutionError as e:
        nbformat.write(nb, out)  # keep the partial run: the failing cell's traceback is in it
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback without terminal colours
        raise RuntimeError(f"{src.name} failed while running headless; the partial notebook is {out}\n{message}") from None
    nbformat.write(nb, out)
    store = workdir / "quickstart.zarr"
    if not store.is_dir():
        raise RuntimeError(f"{src.name} ran but wrote no trace store at {store}")
    return out, store


# ---------------------------------------------------------------------- JupyterLab
@dataclass
class LabServer:
    """A JupyterLab child process on loopback. `stop()` shuts it down (also on leaving a `with` block)."""

    process: subprocess.Popen[bytes]
    port: int
    token: str
    root: Path
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, notebook: str = QUICKSTART) -> str:
        """The Lab URL that opens `notebook`, with the token (what the user pastes into a browser)."""
        return f"{self.base_url}/lab/tree/{notebook}?token={self.token}"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (clean shutdown), then SIGKILL after `timeout_s`; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self._log.close()
        return int(self.process.returncode)

    def __enter__(self) -> LabServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SETTINGS_ENV = "JUPYTERLAB_SETTINGS_DIR"
NOTIFICATION_SETTINGS = Path("@jupyterlab/apputils-extension/notification.jupyterlab-settings")


def lab_settings(root: Path, env: dict[str, str]) -> Path:
    """The demo server's JupyterLab user-settings folder, `root/.jupyter-lab-settings`.

    Created once as a copy of the user's own (their theme and shortcuts carry over; their home is never written),
    with news fetching set to "never" unless they chose otherwise: the first-start "get notified about news?"
    toast would cover the quickstart, and this server must not reach off the machine anyway.
    """
    target = root / ".jupyter-lab-settings"
    if not target.exists():
        source = user_settings_dir(env)
        if source.is_dir():
            shutil.copytree(source, target)
        target.mkdir(parents=True, exist_ok=True)
    news = target / NOTIFICATION_SETTINGS
    if not news.exists():
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text('{\n  // set by `workbench demo`: no news feed (nothing leaves this machine)\n'
                        '  "fetchNews": "false",\n  "checkForUpdates": false\n}\n')
    return target


def user_settings_dir(env: dict[str, str]) -> Path:
    """Where JupyterLab reads user settings for a server started with `env` (jupyterlab's own lookup order)."""
    if env.get(SETTINGS_ENV):
        return Path(env[SETTINGS_ENV])
    config = env.get("JUPYTER_CONFIG_DIR") or str(Path(env.get("HOME", str(Path.home()))) / ".jupyter")
    return Path(config) / "lab" / "user-settings"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_lab(root: Path, *, port: int | None = None, token: str | None = None, env: dict[str, str] | None = None,
              extra_args: Sequence[str] = (), timeout_s: float = START_TIMEOUT_S) -> LabServer:
    """Start JupyterLab on 127.0.0.1 rooted at `root` and return once it answers with the token.

    `env` replaces the environment of the server (tests point HOME and the Jupyter dirs at temp dirs); the token
    is added to it. `extra_args` go to `jupyter lab` last. Raises RuntimeError with the end of the server log if it
    exits or does not answer in time.
    """
    root = root.resolve()
    port = port if port is not None else free_port()
    token = token if token is not None else secrets.token_urlsafe(32)
    log_path = root / ".jupyter-lab.log"  # hidden in Lab's file browser
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={LOOPBACK}",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run as root; Jupyter refuses that without the flag
    cmd += list(extra_args)
    child_env = dict(os.environ if env is None else env, JUPYTER_TOKEN=token)
    child_env[SETTINGS_ENV] = str(lab_settings(root, child_env))
    log = log_path.open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=root,
                               start_new_session=True)
    server = LabServer(process, port, token, root, log_path, log)
    try:
        _wait_until_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: LabServer, timeout_s: float) -> None:
    request = urllib.request.Request(f"{server.base_url}/api/status",
                                     headers={"Authorization": f"token {server.token}"})
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {server.process.returncode} before it answered; "
                               f"the end of its log ({server.log_path}):\n{_tail(server.log_path)}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"JupyterLab did not answer on port {server.port} within {timeout_s:.0f} s; "
                               f"the end of its log ({server.log_path}):\n{_tail(server.log_path)}")
        time.sleep(0.25)


def _tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "(no log)"


def has_display() -> bool:
    """Whether a browser could open a window here (Linux/BSD need an X or Wayland display; macOS and Windows do not)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve_lab(workdir: Path, *, port: int | None = None, open_browser: bool = True) -> int:
    """Copy the notebooks, start Lab on them, print the URL and wait until Ctrl-C (or the server exits)."""
    copied = prepare_workdir(workdir)
    kept = sorted(p.name for p in workdir.glob("*.ipynb") if p not in copied)
    print(f"notebooks in {workdir.resolve()}" + (f" (kept your copies of {', '.join(kept)})" if kept else ""))
    print("starting JupyterLab on 127.0.0.1 ...", flush=True)
    try:
        server = start_lab(workdir, port=port)
    except KeyboardInterrupt:  # start_lab already stopped the half-started server
        print("\ninterrupted before JupyterLab was ready; stopped it", file=sys.stderr)
        return 130
    try:
        url = server.url(QUICKSTART)
        print("\n  JupyterLab is running (loopback only). Open the quickstart at:\n")
        print(f"    {url}\n")
        print(f"  server log: {server.log_path}\n  press Ctrl-C to stop the server\n", flush=True)
        if open_browser and has_display():
            webbrowser.open(url)
        status = server.process.wait()
        print(f"JupyterLab exited with status {status}; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping JupyterLab ...", flush=True)
        status = server.stop()
        print(f"stopped (exit status {status})")
        return 0
    finally:
        server.stop()


# ---------------------------------------------------------------------- terminal summary
def kv_summary(cfg: ModelConfig, context: int) -> str:
    """One line of KV-cache bytes per token in bf16: MLA vs MHA vs GQA, or V4's window + compressed + indexer at
    the prompt's length (its window is a fixed number of tokens, so its share per token depends on the context)."""
    if cfg.is_v4:
        kv = kv_bytes_per_token(cfg, 2, context=context)
        return (f"KV cache per token (bf16, at {context} tokens): window {kv['window']:.1f} B + compressed "
                f"{kv['compressed']:.0f} B + indexer {kv['indexer']:.0f} B = {kv['total']:.1f} B "
                f"(DeepSeek's released formats: {kv['stored']:.1f} B); no MLA latent")
    kv = kv_bytes_per_token(cfg, 2)
    return (f"KV cache per token (bf16): MLA {kv['mla']:.0f} B vs MHA {kv['mha']:.0f} B "
            f"({kv['mha'] / kv['mla']:.1f}x) vs GQA-{kv['gqa_groups']:.0f} {kv['gqa']:.0f} B")


def print_summary(model_name: str, prompt: str, new_tokens: int) -> int:
    """A prompt's routing (expert load per MoE layer), loss, KV-cache sizes and greedy continuation."""
    loaded = load_model(model_name)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    bos = [cfg.bos_token_id] if cfg.bos_token_id is not None else []
    ids = torch.tensor([bos + tok.encode(prompt)])  # [1, S]
    routes: dict[int, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        routes[int(name.split(".")[1])] = value.clone()  # [S, k]

    with torch.no_grad(), model.probes.listen(["blocks.*.mlp.hook_expert_indices"], keep):
        logits = model(ids)  # [1, S, V]
    logprobs = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])  # [S-1, 1]
    print(f"model: {loaded.name} ({cfg.architecture}, {loaded.digest})")
    print(f"  {cfg.num_hidden_layers} layers, MoE layers {list(cfg.moe_layers)}, {cfg.n_routed_experts} routed experts "
          f"(top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, {cfg.scoring_func}) + {cfg.n_shared_experts} shared")
    print(f"prompt: {ids.shape[1]} tokens, mean next-token loss {-logprobs.mean().item():.3f} nats")
    print("routing (expert load per MoE layer, share of token-slots; max/mean 1.0 = perfectly balanced):")
    for layer, chosen in sorted(routes.items()):
        counts = Counter(chosen.flatten().tolist())
        loads = [counts.get(e, 0) for e in range(cfg.n_routed_experts)]
        mean = sum(loads) / len(loads)
        top = ", ".join(f"e{e}:{c}" for e, c in counts.most_common(4))
        print(f"  layer {layer}: max/mean {max(loads) / mean:.2f}, unused {loads.count(0)}, busiest {top}")
    print(kv_summary(cfg, ids.shape[1]))
    out = model.generate(ids, new_tokens)
    print(f"greedy continuation: {tok.decode(out[0, ids.shape[1]:].tolist())!r}")
    return 0
