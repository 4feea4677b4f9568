"""Tables as LaTeX that pdflatex accepts: every cell and header escaped, booktabs rules.

    \\usepackage{booktabs} ... \\input{table1.tex}
"""
from __future__ import annotations

import unicodedata

import pandas as pd

# order matters: the backslash first, so later replacements' own backslashes are not escaped again
_ESCAPES = [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"),
            ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")]
# after escaping (they add braces and backslashes of their own)
_SYMBOLS = [(">=", r"$\geq$"), ("<=", r"$\leq$"), (">", r"$>$"), ("<", r"$<$"), ("|", r"\textbar{}"),
            (" · ", ", "), ("—", "---"), ("–", "--"), ("−", "-")]


def escape(text) -> str:
    """One cell as LaTeX text: special characters escaped, comparison signs in math mode, other non-ASCII
    characters reduced to ASCII (pdflatex's default input encoding is not assumed)."""
    text = "" if text is None or (not isinstance(text, str) and pd.isna(text)) else str(text)
    text = text.replace("\\", "\0")
    for char, replacement in _ESCAPES[1:]:
        text = text.replace(char, replacement)
    text = text.replace("\0", _ESCAPES[0][1])
    for char, replacement in _SYMBOLS:
        text = text.replace(char, replacement)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def to_latex(table: pd.DataFrame, digits: int = 3) -> str:
    """A booktabs ``tabular`` of ``table`` (no index); floats with ``digits`` decimals."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.{digits}f}"
        return escape(value)

    lines = [r"\begin{tabular}{" + "l" * len(table.columns) + "}", r"\toprule",
             " & ".join(escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
