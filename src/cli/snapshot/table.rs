//! A plain text table for the snapshot commands: named columns, each left or right aligned and
//! as wide as its widest cell, so that a command adds a column by adding one heading and one
//! cell per row. It only formats strings; it knows nothing of snapshots.

/// How a column's cells are aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// Rows of cells under headings.
pub(super) struct Table {
    heads: Vec<(&'static str, Align)>,
    rows: Vec<Row>,
}

enum Row {
    Cells(Vec<String>),
    /// A line printed as it is, below the row before it (details, errors).
    Line(String),
}

impl Table {
    /// An empty table with these columns.
    pub(super) fn new(heads: &[(&'static str, Align)]) -> Table {
        Table {
            heads: heads.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Add a row: one cell per column (missing cells are empty, extra ones dropped).
    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(Row::Cells(cells));
    }

    /// Add a line that ignores the columns.
    pub(super) fn line(&mut self, text: String) {
        self.rows.push(Row::Line(text));
    }

    /// The table as text, one line per row, without trailing spaces.
    pub(super) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.heads.iter().map(|(h, _)| h.chars().count()).collect();
        for r in &self.rows {
            if let Row::Cells(cells) = r {
                for (w, c) in widths.iter_mut().zip(cells) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let format = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut line = String::new();
            for (i, ((_, align), w)) in self.heads.iter().zip(&widths).enumerate() {
                let c = cells.next().unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(w.saturating_sub(c.chars().count()));
                match align {
                    Align::Left => {
                        line.push_str(c);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(c);
                    }
                }
            }
            line.trim_end().to_string()
        };
        let mut out = format(&mut self.heads.iter().map(|(h, _)| *h));
        out.push('\n');
        for r in &self.rows {
            match r {
                Row::Cells(cells) => out.push_str(&format(&mut cells.iter().map(String::as_str))),
                Row::Line(text) => out.push_str(text),
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("SIZE", Align::Right),
            ("X", Align::Left),
        ]);
        t.row(vec!["a".into(), "1 B".into(), String::new()]);
        t.line("    detail".into());
        t.row(vec!["longer-name".into(), "10.0 KiB".into(), "y".into()]);
        assert_eq!(
            t.render(),
            "NAME             SIZE  X\n\
             a                 1 B\n    detail\n\
             longer-name  10.0 KiB  y\n"
        );
    }
}
