"""nanoGPT's configurator: settings are the module globals of a script, changed by config files and --key=value.

    python train.py config/stage1.py --micro_batch=16 --vision_lr=0.0

Each config file is plain Python, run in a scratch namespace; every name it assigns must already be a
setting (names starting with _, imported names and functions excepted). Then each --key=value replaces one
setting, the value parsed as a Python literal (a bare word is a string). A key that is not a setting, or a value
whose type differs from the default's, is an error that names it: a typo never silently trains the wrong model.
"""
import ast
import os
import sys


def configure(settings, argv=None):
    """Apply the config files, then the --key=value overrides, from `argv` (default sys.argv[1:]) to the dict
    `settings`: an override wins wherever it stands on the command line."""
    args = sys.argv[1:] if argv is None else argv
    given = list(overrides(args))  # checked first: "--max_steps 3" is a malformed override, not a config file "3"
    for path in [arg for arg in args if not arg.startswith("--")]:
        apply_file(settings, path)
    for arg, key, text in given:
        update(settings, key, parse(text), source=arg)
    return settings


def overrides(args):
    """(arg, key, value text) of each --key=value in `args`."""
    for arg in args:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"override {arg!r} must look like --key=value (one argument, with '=')")
            yield arg, key, text


def command_line_keys(argv=None):
    """The settings that `argv` (default sys.argv[1:]) sets with --key=value."""
    return {key for _, key, _ in overrides(sys.argv[1:] if argv is None else argv)}


def apply_file(settings, path):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, said once
        print(f"configuration from {path}")
    namespace = {}
    with open(path) as f:
        source = f.read()
    exec(compile(source, path, "exec"), namespace)  # a config file is code the user wrote, like nanoGPT's
    imported = imported_names(ast.parse(source, path))
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or (key in imported and key not in settings):
            continue  # the file's own helpers (math, from math import pi, a function), not settings
        update(settings, key, value, source=path)


def imported_names(tree):
    """The names that import statements bind in a parsed file ("import os.path" binds "os")."""
    return {alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}


def merged(settings, overrides, source):
    """A copy of `settings` with the dict `overrides` applied, each key checked like an override."""
    settings = dict(settings)
    for key, value in overrides.items():
        update(settings, key, value, source)
    return settings


def parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --dataset=synthetic


def update(settings, key, value, source):
    if key not in settings:
        raise KeyError(f"{source}: unknown setting {key!r}")
    default = settings[key]
    if default is not None and (value is None or not same_kind(default, value)):
        raise TypeError(f"{source}: setting {key!r} is a {type(default).__name__}, got {value!r} ({type(value).__name__})")
    settings[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value


def same_kind(default, value):
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
