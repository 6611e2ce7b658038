"""Regenerate the command-line section of benchmarks/RESULTS.md from the CLI's JSON files:

    flowsde bench --json benchmarks/bench.json --plot benchmarks/bench.png
    flowsde converge --problem ou --json benchmarks/converge_ou.json --plot benchmarks/converge_ou.png
    python benchmarks/render_results.py

The section between the markers ``<!-- cli:begin -->`` and ``<!-- cli:end -->`` is replaced (appended
the first time); nothing in it is typed by hand.
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flowsde.bench import format_bench  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
BEGIN, END = "<!-- cli:begin -->", "<!-- cli:end -->"


def render() -> str:
    parts = [BEGIN]
    bench = HERE / "bench.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        parts += [f"## {b['date']} — `flowsde bench` on {b['machine']} (device {b['device']}, flowsde {b['flowsde']})",
                  "", format_bench(b["rows"]), "", "![work-precision](bench.png)", ""]
    conv = HERE / "converge_ou.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        parts += [f"## {c['date']} — `flowsde converge --problem {c['problem']}` on {c['machine']} "
                  f"({c['paths']} paths, {c['world_size']} process(es))", "",
                  "| method | kind | problem | fitted order | 95 % interval | theory |", "|---|---|---|---:|---|---:|"]
        for s in c["studies"]:
            lo, hi = s["order_ci"]
            parts.append(f"| {s['method']} | {s['kind']} | {s['problem']} | {s['order']:.3f} | [{lo:.3f}, {hi:.3f}] "
                         f"| {s['expected']:g} |")
        parts += ["", "![convergence](converge_ou.png)", ""]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    results = HERE / "RESULTS.md"
    text = results.read_text()
    section = render()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
