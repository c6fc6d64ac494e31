"""The benchmark report (benchmarks/results/<mode>/report.md + figures) as a user reads it: the verdict first, plain
method names with a legend for the abbreviations, text marks instead of emoji, distinct colours per method. Pure
functions (no Streamlit), so the Benchmarks page stays short and this is tested directly. Nothing is recomputed:
every number is the report's own."""
from __future__ import annotations

import json
import re

import plotly.graph_objects as go

# Method codes and their labels are the benchmark's own: every report's results.json carries them ("methods",
# written by benchmarks/report.py, tracks_report.py, robustness.py), and `method_names` reads them from there.
WORKLOADS = {"W1": "full-precision student", "W2": "ternary (1.58-bit) student", "W3": "1-bit student",
             "W4": "W2 with every method's learning rate ×10 or ×0.1 (robustness to a mis-set LR)"}
# Words the reports use besides the method codes (the page's glossary).
TERMS = {
    "AlgoPerf": "MLCommons' benchmark of training algorithms; this project follows its two tracks below and its "
                "measure, steps to reach a target validation loss.",
    "External tuning track": "every method's learning rate is tuned first, on a separate seed; then compared.",
    "Self-tuning track": "nothing is tuned: one run at each learning rate of a 100× grid, as a user who does not "
                         "know the right LR would run it.",
    "Steps to target": "training steps until the validation loss first reaches the target (fewer is better).",
    "×R, ×H, ×AdamW": "a ratio to the named reference, paired over the same seeds: below 1 is better for "
                      "losses and steps.",
    "[a, b]": "the 95 % paired bootstrap interval of that ratio; when it contains 1 the two are not "
              "distinguishable.",
    "∞": "the method did not reach the target in at least half of the paired runs, so there is no finite ratio.",
    "Performance profile": "for each ratio τ, the share of problems a method solves within τ × the best "
                           "method's steps (higher and further left is better).",
}
# Distinct colours, given to a report's methods in the order its results.json lists them (plotly's D3 + Dark24).
PALETTE = ("#1f77b4", "#222222", "#2ca02c", "#17becf", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#bcbd22", "#7f7f7f", "#ff9896", "#c49c94", "#aec7e8", "#98df8a", "#c5b0d5", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#ffbb78", "#393b79", "#637939", "#8c6d31", "#843c39")
# Emoji marks (blank boxes without an emoji font) -> words.
MARKS = {"✅": "(win)", "❌": "(loss)", "⚠️": "(warning)", "⚠": "(warning)"}
WORDING = ((re.compile(r" ?\(issue \d+\)", re.I), ""), (re.compile(r"\(issue \d+; ", re.I), "("),
           (re.compile(r"Issue \d+ targets"), "Targets set for the hybrid"),
           (re.compile(r"\bbefore issue \d+\b"), "first version"),
           (re.compile(r"\bissue \d+\b", re.I), "the project"))


def method_names(folder) -> dict[str, str]:
    """The report's own method codes -> labels (its results.json "methods", written by the benchmark); {} when the
    report carries none (then the codes are shown as they are)."""
    from pathlib import Path
    try:
        data = json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, dict):
        return {}
    return {str(code): str(label) for code, label in methods.items()}


def _codes(names: dict) -> str:
    return "|".join(sorted(map(re.escape, names), key=len, reverse=True))


_INFINITE = re.compile(r"∞ \[([^\]]*)\]× ((?:the steps of|those of)[^(]*?)\s*\((indistinguishable|not distinguishable|"
                       r"more|fewer|less)\)")
_MISSING_RATIO = re.compile(r"\(–×,?\s*(not distinguishable)?\)|–×")


def tidy_ratios(markdown: str) -> str:
    """No missing value shown as "–×", and no infinite ratio called "indistinguishable": an infinite median means
    the method did not reach the target in at least half the paired runs, which says more than its interval."""
    markdown = _INFINITE.sub(lambda m: f"∞× {m.group(2).strip()} (it did not reach the target in at least half "
                             f"the paired runs; interval [{m.group(1)}])", markdown)
    return _MISSING_RATIO.sub("(no paired value)", markdown)


def situations(markdown: str) -> list[str]:
    """One plain sentence per situation, from the report's own verdict: "LR tuned → …", "LR unknown → …" (and the
    same by KL to the teacher, when the report says it: "LR unknown, closest to the teacher → …"). Empty
    when the report has no such verdict (e.g. the quick report)."""
    _, sections = split_report(markdown)
    text = dict(sections).get("Verdict", "")
    found = []
    # the robustness report's form (benchmarks/robustness.py): "**With a tuned learning rate: X** (label) — …"
    for words, label in (("When you do not know the learning rate", "LR unknown"),
                         ("With a tuned learning rate", "LR tuned"),
                         ("Closest to the teacher when you do not know the learning rate",
                          "LR unknown, closest to the teacher"),
                         ("Closest to the teacher with a tuned learning rate", "LR tuned, closest to the teacher")):
        match = re.search(r"\*\*" + words + r": ([^*]+)\*\*\s*([^.]*\.)?", text)
        if match:
            found.append(f"**{label}** → {match.group(1).strip()}" + (f" {match.group(2).strip()}"
                                                                       if match.group(2) else "."))
    if found:
        return found
    tuned = re.search(r"\*\*With a tuned learning rate, ([^*]+)\*\*:?\s*([^.]*\.)?", text)
    if tuned:
        found.append(f"**LR tuned** → {tuned.group(1).strip()}" + (f": {tuned.group(2).strip()}" if tuned.group(2)
                                                                     else "."))
    unknown = re.search(r"\*\*Without tuning, ([^*]+)\*\*\s*([^;.]*)", text)
    if unknown:
        line = f"**LR unknown** → {unknown.group(1).strip()} {unknown.group(2).strip()}".rstrip()
        best = re.search(r"best: ([\w-]+),", text)       # the method with the lowest median final loss
        if best and best.group(1) != "H":                # H is the sentence's subject; plain() names the code
            line += f"; **{best.group(1)}** ends lowest of all over the grid"
        found.append(line + ".")
    return found


def figures_from_html(html: str) -> list[go.Figure]:
    """The figures of a report's figures.html (plotly's `Plotly.newPlot(id, data, layout, config)` calls), without
    the page's script tag, which loads plotly.js from a CDN: this app loads nothing from the internet."""
    decoder = json.JSONDecoder()
    figures = []
    for match in re.finditer(r"Plotly\.newPlot\(\s*", html):
        at = match.end()
        try:
            _, at = decoder.raw_decode(html, at)                      # the div id
            at = html.index(",", at) + 1
            data, at = decoder.raw_decode(html, len(html[:at]) + len(html[at:]) - len(html[at:].lstrip()))
            at = html.index(",", at) + 1
            layout, _ = decoder.raw_decode(html, len(html[:at]) + len(html[at:]) - len(html[at:].lstrip()))
        except ValueError:
            continue
        figures.append(go.Figure(data=data, layout=layout))
    return figures


def split_report(markdown: str) -> tuple[str, list[tuple[str, str]]]:
    """(the lines before the first section, [(section title, section body)])."""
    parts = re.split(r"^## +(.+)$", markdown, flags=re.M)
    return parts[0], [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def plain(markdown: str, names: dict[str, str] | None = None) -> str:
    """The report's text for a user: text marks, no internal issue numbers, methods named in full (`names`: the
    report's own codes -> labels, method_names)."""
    markdown = tidy_ratios(markdown)
    for mark, word in MARKS.items():
        markdown = markdown.replace(mark, word)
    for pattern, replacement in WORDING:
        markdown = pattern.sub(replacement, markdown)

    if not names:
        return markdown

    def name(match: re.Match) -> str:
        return f"**{names[match.group(1)]}** ({match.group(1)})"

    # "**H0** Hybrid before issue 6 (...)" in a table cell: the plain name, the code in brackets, the cell's own
    # description dropped when it repeats the name.
    markdown = re.sub(r"\| \*\*(" + _codes(names) + r")\*\*[^|]*\|",
                      lambda m: f"| {names[m.group(1)]} ({m.group(1)}) |", markdown)
    return re.sub(r"\*\*(" + _codes(names) + r")\*\*", name, markdown)


def table_rows(body: str) -> list[list[str]]:
    """The cells of the first markdown table in `body` (header first)."""
    rows = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return [row for row in cells if not all(set(c) <= set("-: ") for c in row)]


def verdict(markdown: str) -> str | None:
    """One paragraph: the hybrid vs the tuned reference on the headline workload, and how many of the guide's
    claims the measurements support. None when the report has neither a "Verdict" section (the two-track report
    writes its own, from its ratios) nor a headline table (the quick report's)."""
    _, sections = split_report(markdown)
    by_title = {title: body for title, body in sections}
    if by_title.get("Verdict", "").strip():
        return by_title["Verdict"].strip().split("\n\n")[0]
    headline_title = next((t for t in by_title if t.startswith("Headline")), None)
    if headline_title is None:
        return None
    rows = table_rows(by_title[headline_title])
    if len(rows) < 2:
        return None
    header = rows[0]
    hybrid = next((r for r in rows[1:] if r[0].startswith("**H**")), None)
    if hybrid is None:
        return None
    cell = dict(zip(header, hybrid))
    ratio = cell.get("×R [95 % CI]", "")
    final = cell.get("final ×R [95 % CI]", "")
    parts = [f"On {headline_title.split(':', 1)[-1].strip()}, the **hybrid optimizer** needs **{_words(ratio)}** "
             f"the steps of **tuned AdamW** to reach the target"]
    if final:
        parts.append(f"its final validation loss is **{_words(final)}** tuned AdamW's")
    text = "; ".join(parts) + "."
    claims_title = next((t for t in by_title if "claims" in t.lower()), None)
    if claims_title:
        claims = table_rows(by_title[claims_title])[1:]
        supported = sum(1 for r in claims if len(r) > 2 and "yes" in r[2].lower())
        text += f" The guide's performance claims supported by these measurements: **{supported} of {len(claims)}**."
    return text


def _words(ratio_cell: str) -> str:
    """'0.90 [0.00, 1.33] ·' -> '0.90× (95 % interval 0.00–1.33, no clear difference)'."""
    match = re.match(r"\s*([\d.∞]+)\s*\[([\d.∞]+),\s*([\d.∞]+)\]\s*(\S*)", ratio_cell)
    if not match:
        return ratio_cell or "—"
    value, low, high, mark = match.groups()
    meaning = {"✅": "better", "❌": "worse"}.get(mark, "no clear difference")
    return f"{value}× (95 % interval {low}–{high}: {meaning})"


def recolor(fig: go.Figure, names: dict[str, str] | None = None) -> go.Figure:
    """One colour per method of the report (`names`, in its order) and a legend that names it ("H · Hybrid ...")."""
    names = names or {}
    order = list(names)
    for trace in fig.data:
        code = str(trace.name or "")
        if code in names:
            color = PALETTE[order.index(code) % len(PALETTE)]
            if getattr(trace, "line", None) is not None:
                trace.line.color = color
            if getattr(trace, "marker", None) is not None:
                trace.marker.color = color
            trace.name = f"{code} · {names[code]}"
    # The report's figures carry a fixed width (1100 px) that squeezes side-by-side subplots into a narrower page
    # (their titles ran into each other): the page's width instead, the legend under the plots.
    fig.update_layout(width=None, autosize=True, legend=dict(orientation="h", yanchor="top", y=-0.3, x=0),
                      hoverlabel=dict(namelength=-1), margin=dict(b=120))
    return fig
