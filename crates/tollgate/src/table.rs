//! Plain aligned text tables for people (no colours: output may be piped), and CSV cells.
//!
//! Cells can hold text a caller stored (models, sources, labels, key names): a table shows
//! control characters escaped and cuts a cell at `CELL_CHARS_MAX` characters, so no stored string
//! can move the cursor, colour the terminal, break a row or make a table too wide to print; a CSV
//! cell that a spreadsheet would run as a formula is quoted as text.

/// Longest cell a table shows; longer ones end in `…`.
const CELL_CHARS_MAX: usize = 80;

/// A cell as a table shows it: control characters escaped (`\u{1b}`, `\n`), cut at
/// `CELL_CHARS_MAX` characters.
pub fn cell(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == CELL_CHARS_MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A CSV cell a spreadsheet takes as text: one starting with `=`, `+`, `-`, `@`, a tab or a
/// carriage return (a formula) gets a leading `'`, unless it is a plain number (`-0.5`).
pub fn csv_cell(text: &str) -> String {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula && text.parse::<f64>().is_err() { format!("'{text}") } else { text.to_string() }
}

pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| cell(c)).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i + 1 < cells.len() {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13, finding 3: a 1 MB cell panicked ("Formatting argument out of range"), and
    /// escapes, NUL and line breaks reached the terminal.
    #[test]
    fn stored_strings_render_safely() {
        let huge = "m".repeat(1 << 20);
        let rows = vec![
            vec![huge.clone(), "1".into()],
            vec!["a\u{1b}[31mred\u{0}\r\nnext".into(), "2".into()],
            vec!["claude-sonnet-€€€€".into(), "3".into()],
        ];
        let table = render(&["model", "calls"], &rows);
        assert_eq!(table.lines().count(), 4, "one line per row: {table:?}");
        assert!(!table.contains('\u{1b}') && !table.contains('\0') && !table.contains('\r'), "{table:?}");
        assert!(table.contains("a\\u{1b}[31mred\\u{0}\\r\\nnext"), "{table:?}");
        assert!(table.lines().all(|l| l.chars().count() < 100), "cells are cut");
        assert!(table.contains("claude-sonnet-€€€€"), "{table:?}");
    }

    #[test]
    fn csv_cells_that_look_like_formulas_are_text() {
        assert_eq!(csv_cell("=HYPERLINK(\"http://x\")"), "'=HYPERLINK(\"http://x\")");
        assert_eq!(csv_cell("+1+2"), "'+1+2");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("-2+3"), "'-2+3");
        assert_eq!(csv_cell("-0.5"), "-0.5");
        assert_eq!(csv_cell("claude-sonnet-4-5"), "claude-sonnet-4-5");
    }
}
