"""Run one of NeMo's own scripts in this process, after :func:`patches.apply` (the processes
PyTorch Lightning relaunches for more GPUs come back through relaunch.py and are patched too).

    nemo-minitron nemo SCRIPT [--overrides FILE.yaml]... [--dry-run] [hydra args...]

SCRIPT is a path, or a name resolved under the NeMo install's examples/ directory
(``megatron_gpt_eval.py`` -> /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py,
``tuning/megatron_gpt_finetuning.py`` -> .../language_modeling/tuning/megatron_gpt_finetuning.py).
``--overrides`` files (a path, or a shipped one by name: nemo-minitron configs nemo) are nested YAML mirroring the script's NeMo config; they
become hydra ``key=value`` arguments placed before the command line's own, so the command line
wins. Dotted prefixes listed under the file's ``new_keys`` are keys the NeMo config lacks; they
are passed as ``+key=value``.
"""
from __future__ import annotations

import builtins
import os
import re
import shlex
import sys
import types
from typing import Iterable, List, Optional, Sequence, Tuple

from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.nemo_native import patches, versions

NEW_KEYS = "new_keys"
USAGE = ("usage: nemo-minitron nemo SCRIPT [--overrides FILE.yaml]... [--dry-run] [hydra args...]\n"
         "  SCRIPT: a path, or a name under NeMo's examples/ (megatron_gpt_eval.py, "
         "tuning/megatron_gpt_finetuning.py, ...)")


def nemo_root() -> str:
    """The NeMo source tree holding nemo/ and examples/ (/opt/NeMo in the container)."""
    package_dir = versions.nemo_package_dir()
    if package_dir is None:
        versions.require_nemo_version()  # raises NemoNotInstalledError
    return os.path.dirname(os.path.abspath(package_dir))


def resolve_script(script: str, root: Optional[str] = None) -> str:
    """SCRIPT as given when it is a file, else the one file under ROOT/examples ending with it."""
    if os.path.isfile(script):
        return os.path.abspath(script)
    if os.sep in script and os.path.isabs(script):
        raise MinitronError(f"{script}: no such file")
    root = root or nemo_root()
    examples = os.path.join(root, "examples")
    if not os.path.isdir(examples):
        raise MinitronError(f"{script}: not a file, and the NeMo install at {root} has no "
                            "examples/ directory (a pip-installed NeMo ships none): pass the "
                            "script's path")
    want = os.path.normpath(script)
    found = []
    for dirpath, _, files in os.walk(examples):
        for name in files:
            path = os.path.join(dirpath, name)
            if path.endswith(os.sep + want):
                found.append(path)
    if not found:
        raise MinitronError(f"{script}: no such script under {examples}")
    if len(found) > 1:
        raise MinitronError(f"{script} is ambiguous under {examples}: "
                            f"{', '.join(sorted(os.path.relpath(p, examples) for p in found))}; "
                            "give more of its path")
    return found[0]


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")  # read back by hydra as this very string
_KEYWORDS = {"true", "false", "null", "nan", "inf"}


def _hydra_value(value) -> str:
    """A value in hydra's override grammar (strings quoted, so '<|end_of_text|>' stays intact)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _KEYWORDS:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a hydra override")


def _leaves(tree: dict, prefix: str = "") -> Iterable[Tuple[str, object]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def load_overrides(path: str) -> Tuple[dict, List[str]]:
    """An overrides YAML as (nested dict without ``new_keys``, new_keys list)."""
    from nemo_minitron.config.nemo import load_yaml
    from nemo_minitron.config.recipe import find_config

    data = load_yaml(find_config(path, "nemo"))
    new_keys = data.pop(NEW_KEYS, None) or []
    if not isinstance(new_keys, list) or not all(isinstance(k, str) for k in new_keys):
        raise ConfigError(f"{path}: {NEW_KEYS} must be a list of dotted key prefixes")
    leaves = [p for p, _ in _leaves(data)]
    unused = [k for k in new_keys if not any(p == k or p.startswith(k + ".") for p in leaves)]
    if unused:
        raise ConfigError(f"{path}: {NEW_KEYS} names keys the file does not set: "
                          f"{', '.join(unused)}")
    return data, new_keys


def hydra_overrides(path: str) -> List[str]:
    """The hydra command-line arguments an overrides YAML stands for."""
    data, new_keys = load_overrides(path)
    out = []
    for key, value in _leaves(data):
        plus = "+" if any(key == k or key.startswith(k + ".") for k in new_keys) else ""
        out.append(f"{plus}{key}={_hydra_value(value)}")
    return out


def parse_args(argv: Sequence[str]) -> Tuple[Optional[str], List[str], List[str], bool]:
    """(script, override files, hydra args, dry_run); our options may appear anywhere; script is
    None for -h/--help before SCRIPT."""
    script, files, hydra, dry_run = None, [], [], False
    it = iter(argv)
    for arg in it:
        if arg == "--overrides":
            value = next(it, None)
            if value is None:
                raise MinitronError("--overrides needs a YAML file")
            files.append(value)
        elif arg.startswith("--overrides="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--dry-run":
            dry_run = True
        elif arg in ("-h", "--help") and script is None:
            return None, [], [], False
        elif script is None:
            script = arg
        else:
            hydra.append(arg)
    if script is None:
        raise MinitronError("no SCRIPT given\n" + USAGE)
    return script, files, hydra, dry_run


# PyTorch Lightning starts ranks 1.. of a plain `python` launch by re-running
# [sys.executable, abspath(sys.argv[0])] + sys.argv[1:] (plus hydra.run.dir=... when hydra is in
# use): lightning/fabric/strategies/launchers/subprocess_script.py, _basic_subprocess_cmd and
# _hydra_subprocess_cmd, taken when __main__ has no __spec__. sys.argv[0] is therefore this
# package's relaunch.py, which finds the real script in the environment and patches again.
RELAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relaunch.py")
SCRIPT_ENV = "NEMO_MINITRON_NEMO_SCRIPT"


def run_script(path: str, args: Sequence[str]) -> int:
    """Run a Python script as ``python PATH ARGS...`` would, in this process (sys.argv[0] is
    :data:`RELAUNCH`, so processes the script relaunches get the patches too)."""
    saved_argv, saved_path, saved_env = sys.argv[:], sys.path[:], os.environ.get(SCRIPT_ENV)
    os.environ[SCRIPT_ENV] = path
    sys.argv = [RELAUNCH, *args]
    sys.path.insert(0, os.path.dirname(path))
    saved_main = sys.modules.get("__main__")
    # runpy.run_path would set sys.argv[0] back to PATH while the script runs; run it by hand
    main_module = types.ModuleType("__main__")
    main_module.__dict__.update(__file__=path, __spec__=None, __loader__=None,
                                __builtins__=builtins)
    sys.modules["__main__"] = main_module
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec")
        exec(code, main_module.__dict__)  # noqa: S102 - running the user's chosen NeMo script
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter would
        return 1
    finally:
        sys.modules["__main__"] = saved_main
        sys.argv, sys.path[:] = saved_argv, saved_path
        if saved_env is None:
            os.environ.pop(SCRIPT_ENV, None)
        else:
            os.environ[SCRIPT_ENV] = saved_env
    return 0


def relaunched() -> int:
    """Body of relaunch.py: patch, then run the script named by $NEMO_MINITRON_NEMO_SCRIPT."""
    path = os.environ.get(SCRIPT_ENV)
    if not path or not os.path.isfile(path):
        raise MinitronError(f"{RELAUNCH} runs the NeMo script named by ${SCRIPT_ENV} "
                            f"(now {path!r}); start with: nemo-minitron nemo SCRIPT ...")
    patches.apply(versions.require_nemo_version())
    return run_script(path, sys.argv[1:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    script, files, hydra, dry_run = parse_args(list(sys.argv[1:] if argv is None else argv))
    if script is None:
        print(USAGE)
        return 0
    version = versions.require_nemo_version()
    path = resolve_script(script)
    args = [o for f in files for o in hydra_overrides(f)] + hydra
    needed = versions.needed_patches(version)
    print(f"nemo-minitron: NeMo {version}: patches {', '.join(needed) or 'none needed'}; "
          f"running {path}", file=sys.stderr)
    if dry_run:
        print(shlex.join([sys.executable, path, *args]))
        return 0
    patches.apply(version)
    return run_script(path, args)
