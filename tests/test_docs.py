"""Docs that cannot drift: every command line, config field, flag, quoted default, Python name
and link in the user-facing text exists in the code and says what the code does.

Scanned: README.md, docs/**/*.md (except the dated log docs/history.md), configs/*.py
(docstrings and comments), launch/*.sh, launch/*.py and launch/*.ipynb, including files added
later. Checked:

- every ``--config.a.b`` (``=value`` or bare) resolves to a leaf of the config that the
  surrounding command names (``--config=configs/X.py[:variant]``, or a ``configs/X.py``
  argument of a launch script), else of some config in configs/; a literal ``=value`` parses
  as the field's type; every ``configs/X.py[:variant]`` a command names loads;
- every ``--flag`` of a command ``python -m adm_jax.<entry>`` (also the list form
  ``"-m", "adm_jax.<entry>"``, a launch script that forwards to an entry point, and a shell
  function of a launch script that sets ``ADM_JAX_MODULE``) is a flag of that entry point,
  and a ``--flag=value`` of an enum or ``choices`` flag names one of its values; every
  ``--mode=NAME`` anywhere names a mode of adm_jax.main; a backquoted ``--flag`` in prose
  (or a ``"--flag"`` string in notebook code) written like ours (snake_case, or close to one
  of ours) is a flag of some entry point or of the reference scripts;
- every backquoted ``section.field`` (``train.batch_size``, ``config.sample.sampler``; in
  notebook code also ``"train.num_steps"`` keys) is a field of some config;
- every backquoted ``adm_jax.x.y`` (and ``bench_lib.y``-style) name exists in the sources;
- quoted defaults match configs/default.py (the base every config starts from) and the
  entry points' flag defaults: "`train.remat` (default `none`)", "`x` (..., default 256)",
  "`sample.steps=0` (the default)", "`f` defaults to V", "`f` default V", and tables with a
  "default" column whose first column names fields (the section comes from the nearest
  ``config.SECTION`` / ``SECTION.field`` mentioned above the table or earlier in the
  paragraph);
- relative links point at existing files and headings; ``docs/X.md, "Heading"`` references
  (also in the package's docstrings) name an existing section.

Entry points and their flags are read from the sources (``flags.DEFINE_*`` and argparse's
``add_argument``) without importing them, so the test runs in about a second and needs no JAX.
A quoted error message (an occurrence followed by ``: no such config field``) is skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import pathlib
import re
import shlex
import sys

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # configs/*.py import `from configs import default`
    sys.path.insert(0, str(REPO))

# absl's own flags, accepted by every absl entry point.
ABSL_SPECIAL = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok", "v"}
FILE_SUFFIXES = ("py", "md", "sh", "json", "jsonl", "npz", "png", "pt", "txt", "yaml", "ipynb")


# --------------------------------------------------------------------------- documents


@dataclasses.dataclass
class Doc:
    name: str  # path relative to the repository
    text: str
    labels: list[str]  # labels[i]: where physical line i is ("README.md:12")
    starts: list[int]  # offset of each physical line in text

    def where(self, offset: int) -> str:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return self.labels[lo]


def _doc(name: str, lines: list[str], labels: list[str]) -> Doc:
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    return Doc(name, "\n".join(lines), labels, starts)


def load_doc(path: pathlib.Path) -> Doc:
    name = path.relative_to(REPO).as_posix()
    if path.suffix == ".ipynb":
        lines, labels = [], []
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            src = "".join(cell["source"]).split("\n")
            lines += [*src, ""]  # a blank line between cells ends any command
            labels += [f"{name} cell {i} line {j + 1}" for j in range(len(src))] + [name]
        return _doc(name, lines, labels)
    lines = path.read_text().split("\n")
    return _doc(name, lines, [f"{name}:{i + 1}" for i in range(len(lines))])


# Dated logs keep the names and commands of their date; they are not checked.
HISTORY = {"docs/history.md", "CHANGELOG.md"}


def doc_paths() -> list[pathlib.Path]:
    paths = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    paths = [p for p in paths if p.relative_to(REPO).as_posix() not in HISTORY]
    paths += sorted((REPO / "configs").glob("*.py"))
    for pattern in ("*.sh", "*.py", "*.ipynb"):
        paths += sorted((REPO / "launch").glob(pattern))
    return [p for p in paths if p.is_file()]


@functools.cache
def all_docs() -> tuple[Doc, ...]:
    return tuple(load_doc(p) for p in doc_paths())


# --------------------------------------------------------------------------- entry points


@dataclasses.dataclass
class Flag:
    name: str
    default: object = None  # a literal, or None when not a literal / not given
    has_default: bool = False
    choices: tuple | None = None


@dataclasses.dataclass
class Entry:
    module: str
    absl: bool
    flags: dict[str, Flag]

    def accepts(self, name: str) -> bool:
        if name in self.flags:
            return True
        if self.absl:
            if name in absl_builtin_flags():
                return True
            if name.startswith("no") and name[2:] in self.flags:  # --noforward
                return True
        return False


@functools.cache
def absl_builtin_flags() -> frozenset[str]:
    from absl import app, flags, logging  # noqa: F401  (they define the flags)

    names = set(ABSL_SPECIAL)
    for module, defined in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("absl."):
            names.update(f.name for f in defined)
    return frozenset(names)


def _literal(node, assignments):
    try:
        return ast.literal_eval(node), True
    except ValueError:
        if isinstance(node, ast.Name) and node.id in assignments:
            return _literal(assignments[node.id], {})
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            # ``module.NAME`` of a sibling module (main's ``modes.MODES``): its top-level value.
            path = REPO / "adm_jax" / f"{node.value.id}.py"
            if path.is_file():
                return _literal(ast.Name(node.attr), _assignments(ast.parse(path.read_text())))
        return None, False


def _assignments(tree: ast.Module) -> dict[str, ast.expr]:
    return {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def read_entry(path: pathlib.Path) -> Entry:
    """The flags a module defines: absl ``DEFINE_*`` (anywhere in it, also under
    ``if __name__ == "__main__"``) and argparse ``add_argument("--x", ...)``."""
    tree = ast.parse(path.read_text())
    assignments = _assignments(tree)
    flags, absl = {}, False
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        fn = node.func.attr
        args = node.args
        kw = {k.arg: k.value for k in node.keywords}
        first = args[0].value if args and isinstance(args[0], ast.Constant) else None
        if fn.startswith("DEFINE_") and isinstance(first, str):
            absl = True
            flag = Flag(first)
            if len(args) > 1 or "default" in kw:
                flag.default, flag.has_default = _literal(
                    args[1] if len(args) > 1 else kw["default"], assignments
                )
            if fn == "DEFINE_enum" and (len(args) > 2 or "enum_values" in kw):
                values, ok = _literal(args[2] if len(args) > 2 else kw["enum_values"], assignments)
                flag.choices = tuple(values) if ok else None
            flags[first] = flag
        elif fn == "add_argument" and isinstance(first, str) and first.startswith("--"):
            flag = Flag(first[2:])
            if "default" in kw:
                flag.default, flag.has_default = _literal(kw["default"], assignments)
            elif kw.get("action") and _literal(kw["action"], {})[0] == "store_true":
                flag.default, flag.has_default = False, True
            if "choices" in kw:
                values, ok = _literal(kw["choices"], assignments)
                flag.choices = tuple(values) if ok else None
            flags[first[2:]] = flag
    return Entry(path.relative_to(REPO).with_suffix("").as_posix().replace("/", "."), absl, flags)


@functools.cache
def entries() -> dict[str, Entry]:
    """Every module of the package that runs as ``python -m`` (has a __main__ block)."""
    found = {}
    for path in sorted((REPO / "adm_jax").rglob("*.py")):
        source = path.read_text()
        if re.search(r"^if __name__ == .__main__.:", source, re.M):
            entry = read_entry(path)
            found[entry.module] = entry
    return found


@functools.cache
def launch_forwards() -> dict[str, dict[str, str]]:
    """{file or "*": {command word: entry module}}: launch scripts that run an entry point with
    the caller's flags ("*": usable from any doc), and shell functions of a launch script that
    run one (usable in that script)."""
    table: dict[str, dict[str, str]] = {"*": {}}
    for path in sorted((REPO / "launch").glob("*.sh")):
        text = path.read_text()
        name = path.relative_to(REPO).as_posix()
        modules = re.findall(r'-m\s+"?(?:\$\{ADM_JAX_MODULE:-)?(adm_jax[\w.]*)', text)
        if modules and re.search(r'"\$[@*]"|\$[@*]', text):
            table["*"][name] = modules[-1]
        for func, module in re.findall(
            r"^(\w+)\(\)\s*\{[^}]*ADM_JAX_MODULE=(adm_jax[\w.]*)", text, re.M
        ):
            table.setdefault(name, {})[func] = module
    return table


def main_modes() -> tuple[str, ...]:
    return entries()["adm_jax.main"].flags["mode"].choices


# --------------------------------------------------------------------------- configs


def _load_config_module(name: str):
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_docs_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_config(spec: str) -> ml_collections.ConfigDict:
    """``configs/X.py[:variant]`` as adm_jax.main loads it; raises if it does not load."""
    file, _, variant = spec.partition(":")
    module = _load_config_module(pathlib.Path(file).stem)
    return module.get_config(variant) if variant else module.get_config()


def leaves(config, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.cache
def config_fields(spec: str | None) -> dict[str, object]:
    """Leaves of one config, or (spec None) the union over every config in configs/."""
    if spec is not None:
        return leaves(load_config(spec))
    union = {}
    for path in sorted((REPO / "configs").glob("*.py")):
        if "def get_config" in path.read_text():
            for key, value in config_fields(f"configs/{path.name}").items():
                union.setdefault(key, value)
    return union


@functools.cache
def base_config() -> dict[str, object]:
    return leaves(load_config("configs/default.py"))


@functools.cache
def field_types() -> dict[str, type]:
    """Leaf -> type, including placeholders (typed None), over every config."""
    types = {}

    def walk(config, prefix=""):
        for key in config.keys():
            field = config._fields[key]
            if isinstance(field, ml_collections.ConfigDict):
                walk(field, f"{prefix}{key}.")
            elif isinstance(field, ml_collections.FieldReference):
                types.setdefault(f"{prefix}{key}", field.get_type())
            else:
                types.setdefault(f"{prefix}{key}", type(field))

    for path in sorted((REPO / "configs").glob("*.py")):
        if "def get_config" in path.read_text():
            walk(load_config(f"configs/{path.name}"))
    return types


SECTIONS_RE = r"(?:model|diffusion|data|train|sample|evaluate|nll|classifier)"


# --------------------------------------------------------------------------- commands


@dataclasses.dataclass
class Command:
    doc: Doc
    module: str  # entry module
    start: int  # offset of the first character after the program name
    end: int
    config: str | None  # configs/X.py[:variant] named by the command

    @property
    def text(self) -> str:
        return self.doc.text[self.start : self.end]


def _segment_end(text: str, start: int) -> int:
    """End of the command starting at ``start``: a newline not continued (``\\`` or a
    trailing ``,`` of a Python argument list), or ``;``, ``&&``, ``|``, `` ` ``, `` #``, an
    unopened ``)`` / ``]``, outside quotes."""
    depth, quote, i = 0, None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\n" and quote in "'\"" and not text[:i].rstrip(" ").endswith("\\"):
                return i  # an unclosed quote in prose: stop at the line end
        elif c in "\"'":
            quote = c
        elif c == "\n":
            before = text[start:i].rstrip(" ")
            if not (before.endswith("\\") or before.endswith(",")):
                return i
        elif c in "([":
            depth += 1
        elif c in ")]":
            if depth == 0:
                return i
            depth -= 1
        elif c in ";|`" or text.startswith("&&", i) or (c == "#" and text[i - 1] in " \t"):
            return i
        i += 1
    return i


def _command_config(segment: str) -> str | None:
    match = re.search(r"(?:--config[= ]|(?<![\w/.-]))(configs/\w+\.py(?::\w+)?)", segment)
    return match.group(1) if match else None


def commands(doc: Doc) -> list[Command]:
    found = []
    programs = {**launch_forwards()["*"], **launch_forwards().get(doc.name, {})}
    patterns = [(r"""-m["',\s]+"?(adm_jax(?:\.\w+)+)["']?""", None)]
    patterns += [
        (rf"(?<![\w/.-]){re.escape(word)}(?![\w.-])", mod) for word, mod in programs.items()
    ]
    for pattern, module in patterns:
        for match in re.finditer(pattern, doc.text):
            if doc.name.startswith("launch/") and module is None and "$" in match.group(0):
                continue
            name = module or match.group(1)
            # the definition of a shell function / a script's own exec line is not a use
            line_start = doc.text.rfind("\n", 0, match.start()) + 1
            if re.match(r"\s*\w+\(\)\s*\{", doc.text[line_start : match.start()]):
                continue
            end = _segment_end(doc.text, match.end())
            segment = doc.text[match.end() : end]
            found.append(Command(doc, name, match.end(), end, _command_config(segment)))
    return found


def _tokens(segment: str) -> list[tuple[str, int]]:
    """(token, offset in segment) for the flag-like tokens of a command."""
    out = []
    try:
        words = shlex.split(segment.replace("\\\n", " \n"), comments=False)
    except ValueError:
        words = segment.split()
    pos = 0
    for word in words:
        if any(c.isspace() for c in word):
            continue  # a quoted value such as --flags "--image_size 256 ..."
        token = word.strip("[],\"'")
        at = segment.find(token, pos)
        if at >= 0:
            pos = at + len(token)
        if token.startswith("--") and len(token) > 2:
            out.append((token, max(at, 0)))
    return out


# --------------------------------------------------------------------------- checks


def _skip(doc: Doc, end: int) -> bool:
    return doc.text.startswith(": no such config field", end)


def _placeholder(value: str) -> bool:
    """$VAR, <thing>, {python}, or an upper-case word such as K, N or MODEL."""
    return any(c in value for c in "$<{") or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", value))


def _value_ok(value: str, kind: type) -> bool:
    if _placeholder(value):
        return True
    value = value.strip("\"'")
    try:
        if kind is bool:
            return value.lower() in ("true", "false", "1", "0")
        if kind is int:
            int(value.replace("_", ""))
        elif kind is float:
            float(value.replace("_", ""))
    except ValueError:
        return False
    return True


def check_config_overrides(doc: Doc) -> list[str]:
    errors = []
    spans = [(c.start, c.end, c.config) for c in commands(doc)]
    for match in re.finditer(r"--config\.([A-Za-z_]\w*(?:\.\w+)*)(=[^\s`'\"\\|)\]]*)?", doc.text):
        if _skip(doc, match.end()):
            continue
        field = match.group(1)
        spec = next((s for a, b, s in spans if a <= match.start() < b and s), None)
        try:
            fields = config_fields(spec)
        except Exception as e:  # the command's config file: reported by check_config_files
            del e
            fields = config_fields(None)
            spec = None
        where = doc.where(match.start())
        if field not in fields:
            scope = spec or "any config in configs/"
            hint = (
                " (a section, not a field)"
                if any(k.startswith(field + ".") for k in fields)
                else ""
            )
            errors.append(f"{where}: --config.{field}: not a field of {scope}{hint}")
            continue
        value = (match.group(2) or "=")[1:]
        kind = field_types().get(field, str)
        if value and not _value_ok(value, kind):
            errors.append(f"{where}: --config.{field}={value}: not a {kind.__name__}")
    return errors


def check_config_files(doc: Doc) -> list[str]:
    errors = []
    for command in commands(doc):
        for match in re.finditer(r"configs/(\w+)\.py(?::\w+)?", command.text):
            spec = match.group(0)
            if _placeholder(match.group(1)):
                continue
            try:
                load_config(spec)
            except Exception as e:
                where = doc.where(command.start + match.start())
                errors.append(f"{where}: {spec} does not load: {type(e).__name__}: {e}")
    return errors


def check_entry_flags(doc: Doc) -> list[str]:
    errors = []
    for command in commands(doc):
        entry = entries().get(command.module)
        where = doc.where(command.start)
        if entry is None:
            errors.append(f"{where}: python -m {command.module}: no such entry point")
            continue
        for token, at in _tokens(command.text):
            name, eq, value = token[2:].partition("=")
            if name.startswith("config."):
                continue  # check_config_overrides
            where = doc.where(command.start + at)
            if not entry.accepts(name):
                errors.append(f"{where}: {token}: not a flag of {command.module}")
                continue
            flag = entry.flags.get(name)
            if eq and flag and flag.choices and not _placeholder(value):
                if value.strip("\"'") not in flag.choices:
                    errors.append(
                        f"{where}: {token}: {command.module} --{name} takes one of "
                        f"{', '.join(map(str, flag.choices))}"
                    )
    return errors


# Flags of other programs that docs quote: the reference scripts' (guided-diffusion README and
# scripts; the model flags come from configs/default.py), pytest's; XLA's start with "xla_".
REFERENCE_SCRIPT_FLAGS = {
    "diffusion_steps", "noise_schedule", "sigma_small", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "timestep_respacing", "model_path",
    "classifier_path", "classifier_scale", "batch_size", "num_samples", "use_ddim",
    "clip_denoised", "anneal_lr", "lr", "weight_decay", "microbatch", "iterations",
    "save_interval", "noised", "base_samples", "large_size", "small_size", "lr_anneal_steps",
    "ema_rate", "data_dir", "log_interval", "resume_checkpoint", "schedule_sampler",
}  # fmt: skip
PYTEST_FLAGS = {"durations", "dist", "no-loadscope-reorder", "maxprocesses"}


@functools.cache
def known_flags() -> frozenset[str]:
    from configs import default

    names = set(absl_builtin_flags()) | REFERENCE_SCRIPT_FLAGS | PYTEST_FLAGS
    names |= set(default.UNET_FLAGS) | set(default.CLASSIFIER_FLAGS)
    for entry in entries().values():
        names |= set(entry.flags)
        if entry.absl:
            names |= {f"no{n}" for n in entry.flags}
    return frozenset(names)


def _ours(name: str) -> bool:
    """Written like an adm_jax flag (snake_case) or one letter or two from one; other tools'
    flags (sbatch's --nodes, gcloud's --zone, pip's --user) are not checked."""
    entry_flags = [n for e in entries().values() for n in e.flags]
    return "_" in name or bool(difflib.get_close_matches(name, entry_flags, n=1, cutoff=0.8))


def check_prose_flags(doc: Doc) -> list[str]:
    """A backquoted ``--flag`` outside a command, written like one of ours, is a flag of some
    entry point (or of a program named in REFERENCE_SCRIPT_FLAGS / PYTEST_FLAGS, or XLA's)."""
    errors = []
    spans = [(c.start, c.end) for c in commands(doc)]
    pattern = r"`(--([A-Za-z_][\w-]*))"
    if doc.name.endswith((".py", ".ipynb")):  # also "--flag" strings of argument lists
        pattern = r"(?:`|(?<=[\"']))(--([A-Za-z_][\w-]*))(?=[`\"'=])"
    for match in re.finditer(pattern, doc.text):
        name = match.group(2)
        if any(a <= match.start() < b for a, b in spans) or name.startswith(("config.", "xla_")):
            continue
        if doc.text.startswith("*", match.end()) or name in known_flags():  # `--classifier_*`
            continue
        if not _ours(name):
            continue
        errors.append(f"{doc.where(match.start())}: {match.group(1)}: no entry point has this flag")
    return errors


def check_modes(doc: Doc) -> list[str]:
    errors = []
    spans = [(c.start, c.end) for c in commands(doc) if c.module == "adm_jax.main"]
    for match in re.finditer(r"--mode[= ]([A-Za-z_]\w*)", doc.text):
        if any(a <= match.start() < b for a, b in spans):
            continue  # check_entry_flags checks it against the flag's enum
        if match.group(1) not in main_modes():
            errors.append(
                f"{doc.where(match.start())}: --mode={match.group(1)}: adm_jax.main's modes are "
                f"{', '.join(main_modes())}"
            )
    return errors


def check_field_mentions(doc: Doc) -> list[str]:
    """Backquoted ``section.field`` / ``config.section.field`` names."""
    errors = []
    fields = config_fields(None)
    pattern = rf"`(?:config\.)?({SECTIONS_RE}(?:\.\w+)+)(?=[`=\s(,:\[])"
    if doc.name.endswith((".py", ".ipynb")):  # also "train.num_steps" keys of override dicts
        pattern = rf"(?:`|\B[\"'])(?:config\.)?({SECTIONS_RE}(?:\.\w+)+)(?=[`\"'=\s(,:\[])"
    for match in re.finditer(pattern, doc.text):
        name = match.group(1)
        if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue
        if name in fields or any(k.startswith(name + ".") for k in fields):
            continue
        if python_name_error(f"adm_jax.{name}") is None:
            continue  # `data.DATA_ITER_ITEM`: a name of the package, not a config field
        errors.append(f"{doc.where(match.start())}: `{name}`: no such config field or section")
    return errors


# ---- quoted defaults


def _norm_doc_value(value: str) -> str:
    return value.strip().strip("`").strip().rstrip(".,;:)").strip("`\"'")


def _same(doc_value: str, actual: object) -> bool:
    text = _norm_doc_value(doc_value)
    if actual is None:
        return text.lower() in ("none", "unset", "off")
    if isinstance(actual, bool):
        return text.lower() == str(actual).lower()
    if isinstance(actual, (int, float)):
        try:
            return float(text.replace("_", "").replace(",", "")) == float(actual)
        except ValueError:
            return False
    if isinstance(actual, (list, tuple)):
        return text in (",".join(map(str, actual)), str(actual))
    if actual == "":
        return text in ("", '""', "''") or doc_value.strip() in ('`""`', "`''`", '""')
    return text == str(actual)


def _section_context(doc: Doc, offset: int) -> str | None:
    """The config section a bare field name at ``offset`` belongs to: the last
    ``config.SECTION`` or ``SECTION.field`` mention in the text before it, within the
    paragraph, or (for a table) in the paragraph above the table."""
    before = doc.text[:offset]
    paragraph_start = before.rfind("\n\n")
    if before[paragraph_start + 2 :].lstrip().startswith("|"):  # a table: its lead-in too
        paragraph_start = before.rfind("\n\n", 0, max(paragraph_start, 0))
    window = before[max(paragraph_start, 0) :]
    hits = re.findall(rf"(?:config\.|`|--config\.)({SECTIONS_RE})(?=[.`\s])", window)
    return hits[-1] if hits else None


def _resolve(doc: Doc, offset: int, name: str) -> tuple[str, object] | None:
    """(display name, documented-default holder) for a field or flag name, or None."""
    base = base_config()
    if name.startswith("--"):
        flag_name = name[2:]
        for module in ("adm_jax.main", *sorted(entries())):
            flag = entries()[module].flags.get(flag_name)
            if flag and flag.has_default:
                return f"{module} {name}", flag.default
        return None
    name = name.removeprefix("config.")
    if name in base:
        return name, base[name]
    if "." not in name:
        section = _section_context(doc, offset)
        if section and f"{section}.{name}" in base:
            return f"{section}.{name}", base[f"{section}.{name}"]
    return None


def check_defaults(doc: Doc) -> list[str]:
    errors = []
    found: list[tuple[int, str, str]] = []  # (offset, name, documented value)
    field = r"`((?:--)?[A-Za-z_][\w.]*)`"
    # a value: `quoted`, or one bare word that ends its clause ("default 256)", "default
    # bfloat16;"), so that "default locations below" is prose, not a value
    value = r"(`[^`]*`|[^\s,;()`]+(?=[),;]|\.\s))"
    # "`f` (default V" / "`f` (..., default V" / "`f` (...; default: V"
    for m in re.finditer(field + r"\s*\(([^()]*?)\bdefault:?\s+" + value, doc.text):
        found.append((m.start(), m.group(1), m.group(3)))
    # "`f` default V" / "`f`: default V"
    for m in re.finditer(field + r":?\s+default:?\s+" + value, doc.text):
        found.append((m.start(), m.group(1), m.group(2)))
    # "`f` defaults to V"
    for m in re.finditer(field + r"\s+defaults\s+to\s+" + value, doc.text):
        found.append((m.start(), m.group(1), m.group(2)))
    # "`f=V` (the default)" / "`f=V` (default)"
    for m in re.finditer(r"`([A-Za-z_][\w.]*)=([^`]*)`\s*\((?:the\s+)?default\)", doc.text):
        found.append((m.start(), m.group(1), m.group(2)))
    # "`f`: `V` (..., the default)" / "`f`: `V` (default)"
    for m in re.finditer(
        field + r":\s*(`[^`]*`)\s*\((?:[^()]*,\s*)?(?:the\s+)?default\)", doc.text
    ):
        found.append((m.start(), m.group(1), m.group(2)))
    found += _table_defaults(doc)
    for offset, name, value in found:
        resolved = _resolve(doc, offset, name)
        if resolved is None:
            continue
        shown, actual = resolved
        if not _same(value, actual):
            errors.append(
                f"{doc.where(offset)}: `{name}` documented default {_norm_doc_value(value)!r}, "
                f"the code's is {actual!r} ({shown})"
            )
    return errors


def _table_defaults(doc: Doc) -> list[tuple[int, str, str]]:
    """Rows of markdown tables with a "default" column whose first column is a `name`."""
    out = []
    lines = doc.text.split("\n")
    offsets = doc.starts if len(doc.starts) == len(lines) else None
    if offsets is None:
        return out
    column = None
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            lowered = [c.lower() for c in cells]
            column = next((j for j, c in enumerate(lowered) if c.startswith("default")), -1)
            continue
        if column < 0 or set("".join(cells)) <= set("-: ") or len(cells) <= column:
            continue
        name = re.fullmatch(r"`((?:--)?[A-Za-z_][\w.]*)`", cells[0])
        if name:
            out.append((offsets[i], name.group(1), cells[column]))
    return out


# ---- Python names


@functools.cache
def py_modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> source, for the package."""
    out = {}
    for path in sorted((REPO / "adm_jax").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@functools.cache
def short_modules() -> dict[str, str]:
    """Distinctive basenames (with an underscore, unique) -> dotted module: `bench_lib.x`."""
    names: dict[str, list[str]] = {}
    for dotted in py_modules():
        names.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    return {k: v[0] for k, v in names.items() if "_" in k and len(v) == 1 and k != "adm_jax"}


@functools.cache
def module_names(dotted: str) -> dict[str, ast.AST | None]:
    """Top-level names of a module (node for a class, None otherwise), plus submodules."""
    tree = ast.parse(py_modules()[dotted].read_text())
    names: dict[str, ast.AST | None] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names[t.id] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
        elif isinstance(node, (ast.If, ast.Try)):  # names defined under a guard
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.setdefault(sub.name, None)
    for other in py_modules():
        if other.startswith(dotted + ".") and "." not in other[len(dotted) + 1 :]:
            names.setdefault(other.rsplit(".", 1)[-1], None)
    return names


def _class_names(node: ast.ClassDef) -> set[str]:
    out = set()
    for sub in node.body:
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(sub.name)
        elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
            out.add(sub.target.id)
        elif isinstance(sub, ast.Assign):
            out.update(t.id for t in sub.targets if isinstance(t, ast.Name))
    return out


def python_name_error(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] in short_modules():
        parts = short_modules()[parts[0]].split(".") + parts[1:]
    module = next(
        (
            ".".join(parts[:i])
            for i in range(len(parts), 0, -1)
            if ".".join(parts[:i]) in py_modules()
        ),
        None,
    )
    if module is None:
        return "no such module"
    rest = parts[len(module.split(".")) :]
    if not rest:
        return None
    names = module_names(module)
    if rest[0] not in names:
        return f"{module} has no {rest[0]}"
    node = names[rest[0]]
    if len(rest) > 1 and isinstance(node, ast.ClassDef) and rest[1] not in _class_names(node):
        bases = [b for b in node.bases if not isinstance(b, ast.Name) or b.id != "object"]
        if not bases:
            return f"{module}.{rest[0]} has no {rest[1]}"
    return None


def check_python_names(doc: Doc) -> list[str]:
    """Backquoted ``adm_jax.x.y`` (and ``bench_lib.y``-style) names exist in the sources."""
    errors = []
    short = "|".join(map(re.escape, short_modules()))
    pattern = rf"`((?:adm_jax|{short})(?:\.\w+)*)(?=[`(\[ ])"
    for match in re.finditer(pattern, doc.text):
        name = match.group(1)
        if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue
        problem = python_name_error(name)
        if problem:
            errors.append(f"{doc.where(match.start())}: `{name}`: {problem}")
    return errors


# ---- links


def github_anchor(heading: str) -> str:
    """GitHub's id for a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@functools.cache
def anchors(path: pathlib.Path) -> frozenset[str]:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*$", line)
        if match:
            anchor = github_anchor(match.group(1))
            n = seen.get(anchor, 0)
            seen[anchor] = n + 1
            found.add(anchor if n == 0 else f"{anchor}-{n}")
    return frozenset(found)


def check_links(doc: Doc) -> list[str]:
    """Relative markdown links point at existing files, and their #anchors at headings."""
    errors = []
    if not doc.name.endswith((".md", ".ipynb")):
        return errors
    base = (REPO / doc.name).parent
    for match in re.finditer(r"\]\(([^)\s]+)\)", doc.text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        path = (base / file).resolve() if file else REPO / doc.name
        where = doc.where(match.start())
        if not path.exists():
            errors.append(f"{where}: link {target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            errors.append(f"{where}: link {target}: no heading #{anchor} in {path.name}")
    return errors


@functools.cache
def headings(path: pathlib.Path) -> tuple[str, ...]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return tuple(
        " ".join(m.group(1).replace("`", "").lower().split())
        for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", text, re.M)
    )


def _section_reference_errors(name: str, text: str, where) -> list[str]:
    errors = []
    pattern = r"([\w./-]+\.md)(?:\]\([^)]*\))?\)?,\s+\"([^\"]+)\""
    for match in re.finditer(pattern, text):
        file, section = match.group(1), " ".join(match.group(2).replace("`", "").lower().split())
        base = (REPO / name).parent
        candidates = [base / file, REPO / file, REPO / "docs" / file]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            errors.append(f"{where(match.start())}: {file}: no such file")
        elif not any(h.startswith(section) for h in headings(path)):
            errors.append(f'{where(match.start())}: {file}, "{match.group(2)}": no such section')
    return errors


def check_section_references(doc: Doc) -> list[str]:
    """``docs/X.md, "Heading"`` names a heading of that file (the start of its text)."""
    return _section_reference_errors(doc.name, doc.text, doc.where)


CHECKS = {
    "config overrides": check_config_overrides,
    "config files": check_config_files,
    "entry-point flags": check_entry_flags,
    "flags in prose": check_prose_flags,
    "modes": check_modes,
    "config field names": check_field_mentions,
    "documented defaults": check_defaults,
    "Python names": check_python_names,
    "links": check_links,
    "section references": check_section_references,
}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("check", list(CHECKS))
def test_docs(check):
    errors = [e for doc in all_docs() for e in CHECKS[check](doc)]
    assert not errors, f"{len(errors)} wrong {check} in the docs:\n" + "\n".join(errors)


def test_package_docstrings_name_existing_sections():
    """The package's docstrings and comments refer to docs sections that exist."""
    errors = []
    for path in sorted((REPO / "adm_jax").rglob("*.py")):
        doc = load_doc(path)
        errors += _section_reference_errors(doc.name, doc.text, doc.where)
    assert not errors, "\n".join(errors)


def test_the_scan_sees_the_docs():
    """The scan covers what it claims: the user docs, configs, launch scripts and notebook,
    the entry points the docs run, and their flags (a regression here would let the checks
    above pass on nothing)."""
    names = {d.name for d in all_docs()}
    assert {"README.md", "configs/default.py", "launch/colab_tpu.ipynb"} <= names
    assert any(n.startswith("docs/") for n in names)
    assert {"adm_jax.main", "adm_jax.bench", "adm_jax.convert"} <= set(entries())
    assert {"workdir", "mode", "config", "verbose"} <= set(entries()["adm_jax.main"].flags)
    assert {"checkpoint", "flags", "out", "kind"} <= set(entries()["adm_jax.convert"].flags)
    assert "train" in main_modes() and "evaluate" in main_modes()
    used = {c.module for d in all_docs() for c in commands(d)}
    assert {"adm_jax.main", "adm_jax.bench", "adm_jax.convert"} <= used
    assert launch_forwards()["*"].get("launch/tpu_pod.sh") == "adm_jax.main"


BAD = """\
Train with

```bash
python -m adm_jax.main --config=configs/imagenet64.py --workdir=$W \\
    --config.train.batch_sise=8 --mode=trian --verbos \\
    --config.model.large_size=256 --config.train.batch_size=lots
python -m adm_jax.bench --config=configs/tiny.py --sample_dtype=fp8 --what=train
python -m adm_jax.convert --checkpoint a.pt --flags "--image_size 256" --output x
bash launch/tpu_pod.sh configs/imagenet256.py --config.sample.clasifier_scale=2
```

`train.remat` (default `full`) and `evaluate.batch_size` (global; default 256), `sample.steps=0`
(the default), `sample.classifier_scale` defaults to 0.0, `train.atention_impl`.
`--config.train.batch_sise: no such config field`; `--verbos`, `--nodes=2`, `--heartbeat_timout`.

`config.nll` fields:

| field | default | meaning |
|---|---|---|
| `num_samples` | 100 | images |
| `seed` | 0 | noise |

See [the table](docs/training.md#no-such-heading) and [this](missing.md).
`train.lr` default 1. See docs/sampling.md, "Which sampler" and docs/training.md, "No such part".
"""


def test_the_checks_catch_mistakes():
    """Each check fails on a document with the mistakes it exists for, naming file and line."""
    doc = _doc("bad.md", BAD.split("\n"), [f"bad.md:{i + 1}" for i in range(BAD.count("\n") + 1)])
    report = "\n".join(e for check in CHECKS.values() for e in check(doc))
    expected = [
        "bad.md:5: --config.train.batch_sise: not a field of configs/imagenet64.py",
        "bad.md:5: --mode=trian: adm_jax.main --mode takes one of train, train_classifier,",
        "bad.md:5: --verbos: not a flag of adm_jax.main",
        "bad.md:6: --config.model.large_size: not a field of configs/imagenet64.py",
        "bad.md:6: --config.train.batch_size=lots: not a int",
        "bad.md:7: --sample_dtype=fp8: adm_jax.bench --sample_dtype takes one of",
        "bad.md:8: --output: not a flag of adm_jax.convert",
        "bad.md:9: --config.sample.clasifier_scale: not a field of configs/imagenet256.py",
        "bad.md:12: `train.remat` documented default 'full', the code's is 'none'",
        "bad.md:12: `evaluate.batch_size` documented default '256', the code's is 64",
        "bad.md:13: `train.atention_impl`: no such config field",
        'bad.md:24: docs/training.md, "No such part": no such section',
        "bad.md:24: `train.lr` documented default '1', the code's is 0.0001",
        "bad.md:14: --verbos: no entry point has this flag",
        "bad.md:14: --heartbeat_timout: no entry point has this flag",
        "bad.md:13: `sample.classifier_scale` documented default '0.0', the code's is 1.0",
        "bad.md:23: link docs/training.md#no-such-heading: no heading #no-such-heading",
        "bad.md:23: link missing.md: no such file",
        "bad.md:20: `num_samples` documented default '100', the code's is 1000 (nll.num_samples)",
    ]
    for line in expected:
        assert line in report, f"not reported: {line!r}\nreport:\n{report}"
    assert "bad.md:14: --config" not in report  # a quoted error message
    assert "--image_size" not in report  # inside --flags "...": the reference's flags
    assert "seed" not in report and "bad.md:12: `sample.steps" not in report
    assert len(report.split("\n")) == len(expected), report


def test_the_checks_catch_mistakes_in_notebook_code():
    """In notebook and Python code, argument lists and override dicts are checked too."""
    code = [
        'command = ["--chekpoint", checkpoint, "--out", out]',
        'subprocess.run([sys.executable, "-m", "adm_jax.convert", *command], check=True)',
        'DEMO_OVERRIDES = {"train.num_train_steps": 500, "train.num_steps": 700}',
    ]
    doc = _doc("bad.ipynb", code, [f"bad.ipynb cell 4 line {i + 1}" for i in range(len(code))])
    report = "\n".join(e for check in CHECKS.values() for e in check(doc))
    assert report.split("\n") == [
        "bad.ipynb cell 4 line 1: --chekpoint: no entry point has this flag",
        "bad.ipynb cell 4 line 3: `train.num_train_steps`: no such config field or section",
    ], report
