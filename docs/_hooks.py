"""MkDocs hooks: show benchmark figures and model cards that exist, and say plainly which do not.

Benchmark figures are written by the scripts in `benchmarks/` into `benchmarks/results/`,
outside `docs/`. `on_files` adds every PNG there to the site under the same path, so pages can
link `benchmarks/results/NAME.png`. Pages use three directives (HTML comments, so the Markdown
reads cleanly without the hook):

* `<!-- figure: PATH | CAPTION | COMMAND -->`: the figure with its caption and the command that
  produced it if `PATH` (relative to the repository root) exists, else a note that it has not
  been measured yet, with the command that would produce it.
* `<!-- other-figures: DIR -->`: every PNG in `DIR` that no `figure` directive on the page
  named, or nothing.
* `<!-- model-cards -->`: a list of the pages in `docs/model_cards/`, or a note that none
  exist yet.
* On model cards (`docs/model_cards/*.md`), an image whose file is missing (a figure not yet
  generated and committed) is replaced by a visible note saying so, instead of a broken link.
* `<!-- mlmc-vs-mc-table: GLOB -->`: one table row per record of the `benchmarks/mlmc_vs_mc.py`
  JSON files matching `GLOB` (repository root), with each file's command; a note if none.
"""

from __future__ import annotations

import glob
import json
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
FIGURE_DIRS = (
    "benchmarks/results",
    "benchmarks/results/suite",
    "benchmarks/results/suite-ancestral",
)
MATHJAX_DEST = "assets/mathjax"
_FIGURE = re.compile(r"<!--\s*figure:\s*(.+?)\s*\|\s*(.+?)\s*\|\s*(.+?)\s*-->")
_OTHER = re.compile(r"<!--\s*other-figures:\s*(\S+)\s*-->")
_CARDS = re.compile(r"<!--\s*model-cards\s*-->")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_TABLE = re.compile(r"<!--\s*mlmc-vs-mc-table:\s*(\S+)\s*-->")
_SUITE = re.compile(r"<!--\s*bench-suite:\s*(\S+)\s*-->")


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _mlmc_vs_mc_table(pattern: str) -> str:
    paths = sorted(glob.glob(str(ROOT / pattern)))
    if not paths:
        return (
            '!!! note "Not yet measured"\n'
            f"    No `{pattern}` in this build; `benchmarks/README.md` has the commands.\n"
        )
    rows = [
        "| problem | spacing | eps | MLMC NFEs | MC NFEs | NFE ratio | wall ratio "
        "| realised RMSE MLMC / MC | alpha | beta | levels |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            commands.append(f"- `{data['command']}` -> `{Path(path).relative_to(ROOT)}`")
            for r in data["records"]:
                mlmc, mc = r["mlmc"], r.get("mc") or {}
                measured = "cost_nfe" in mc
                mc_cost = mc["cost_nfe"] if measured else mlmc.get("mc_cost_prediction")
                rows.append(
                    f"| {r['problem']} | {r.get('spacing', '-')} | {r['eps']:g} "
                    f"| {mlmc['cost_nfe']:,} "
                    f"| {_fmt(mc_cost, ',')}{'' if measured else ' (predicted)'} "
                    f"| {_fmt(r.get('nfe_ratio'), '.2f')} | {_fmt(r.get('wall_ratio'), '.2f')} "
                    f"| {_fmt(mlmc.get('realised_rmse'), '.2g')} / "
                    f"{_fmt(mc.get('realised_rmse'), '.2g')} "
                    f"| {_fmt(mlmc.get('alpha'), '.2f')} | {_fmt(mlmc.get('beta'), '.2f')} "
                    f"| {'-'.join(str(v) for v in mlmc.get('levels', []))} |"
                )
        except (KeyError, TypeError, ValueError) as err:
            commands.append(f"- `{Path(path).relative_to(ROOT)}`: not readable here ({err!r})")
    return "\n".join(rows) + "\n\nProduced by:\n\n" + "\n".join(commands) + "\n"


def on_files(files, config):
    for folder in FIGURE_DIRS:
        for path in sorted((ROOT / folder).glob("*.png")):
            rel = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(rel) is None:
                files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    _add_mathjax(files, config)
    return files


def _add_mathjax(files, config):
    """Copy MathJax 2 (from the `jupyter-server-mathjax` package, in the `docs` extra) into the
    site under `assets/mathjax/`, so formulas render with no script from the network. PNG
    fallback fonts are left out (browsers use the web fonts)."""
    import jupyter_server_mathjax

    static = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"
    for path in sorted(static.rglob("*")):
        rel = path.relative_to(static).as_posix()
        if path.is_dir() or "/png/" in f"/{rel}" or rel == "LICENSE":
            continue
        files.append(File.generated(config, f"{MATHJAX_DEST}/{rel}", abs_src_path=str(path)))


def _link(page, target: str) -> str:
    return posixpath.relpath(target, posixpath.dirname(page.file.src_uri) or ".")


def _suite(page, folder: str) -> str:
    """The suite's ratio table (`summary.md`) and one figure per problem, or a note."""
    root = ROOT / folder
    summary = root / "summary.md"
    if not summary.is_file():
        return (
            '!!! note "The benchmark suite has not been run in this build"\n'
            f"    `numpyro-mlmc bench` writes `{folder}/summary.md` and one figure per problem.\n"
        )
    parts = [summary.read_text()]
    for png in sorted(root.glob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        parts.append(f"![{png.stem}]({_link(page, rel)})\n\n`{png.stem}` (`{rel}`)")
    return "\n\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    named = set()
    markdown = _SUITE.sub(lambda m: _suite(page, m.group(1)), markdown)

    def figure(match):
        path, caption, command = match.groups()
        named.add(path)
        if (ROOT / path).is_file():
            return (
                f"![{caption}]({_link(page, path)})\n\n"
                f"*{caption}.* Produced by `{command}` (`{path}`)."
            )
        return (
            f'!!! note "Not yet measured: {caption}"\n'
            f"    `{path}` is not in this build. It is written by `{command}`; this page "
            "shows it once the run's output is committed.\n"
        )

    def other(match):
        folder = match.group(1)
        extra = [
            p.relative_to(ROOT).as_posix()
            for p in sorted((ROOT / folder).glob("*.png"))
            if p.relative_to(ROOT).as_posix() not in named
        ]
        return "\n\n".join(f"![{Path(p).stem}]({_link(page, p)})\n\n`{p}`" for p in extra)

    def cards(_):
        pages = sorted((ROOT / "docs" / "model_cards").glob("*.md"))
        if not pages:
            return (
                '!!! note "No model cards in this build"\n'
                "    The model cards of the shipped priors live in `docs/model_cards/`; none "
                "are there yet.\n"
            )
        return "\n".join(f"- [{p.stem}]({_link(page, 'model_cards/' + p.name)})" for p in pages)

    if page.file.src_uri.startswith("model_cards/"):
        folder = Path(page.file.abs_src_path).parent

        def image(match):
            target = match.group(2)
            if "://" in target or (folder / target).is_file():
                return match.group(0)
            return f"*(Figure `{target}` is not in this build: {match.group(1) or 'no caption'}.)*"

        markdown = _IMAGE.sub(image, markdown)
    markdown = _TABLE.sub(lambda m: _mlmc_vs_mc_table(m.group(1)), markdown)
    markdown = _FIGURE.sub(figure, markdown)
    markdown = _OTHER.sub(other, markdown)
    return _CARDS.sub(cards, markdown)
