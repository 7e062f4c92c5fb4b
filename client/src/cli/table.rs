//! Plain-text tables for people: a header row and aligned columns, two spaces apart. The last
//! column is not padded, so lines carry no trailing blanks.

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table being filled row by row.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let align = vec![Align::Left; headers.len()];
        Self {
            headers,
            align,
            rows: Vec::new(),
        }
    }

    /// Right-aligns the columns named `headers` (numbers read better that way).
    pub fn right(mut self, headers: &[&str]) -> Self {
        for (h, a) in self.headers.iter().zip(self.align.iter_mut()) {
            if headers.contains(&h.as_str()) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells
            .into_iter()
            .map(Into::into)
            .take(self.headers.len())
            .collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row after the header, each ending in `\n`.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                std::iter::once(&self.headers[i])
                    .chain(self.rows.iter().map(|r| &r[i]))
                    .map(|c| width(c))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - width(cell);
                let last = i + 1 == row.len();
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(["ID", "CPU", "NAME"]).right(&["CPU"]);
        t.row(["a", "0.5", "first"]);
        t.row(["bbbb", "16", "x"]);
        assert_eq!(
            t.render(),
            "ID    CPU  NAME\n\
             a     0.5  first\n\
             bbbb   16  x\n"
        );
    }

    #[test]
    fn header_only_and_ragged_rows() {
        let mut t = Table::new(["A", "B"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "A  B\n");
        t.row(["long value"]);
        t.row(["x", "y", "dropped"]);
        assert_eq!(t.render(), "A           B\nlong value\nx           y\n");
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut t = Table::new(["NAME", "X"]);
        t.row(["héllo", "1"]);
        assert_eq!(t.render(), "NAME   X\nhéllo  1\n");
    }
}
