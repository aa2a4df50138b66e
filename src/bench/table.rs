//! Plain-text tables: the first column left-aligned, the others (numbers)
//! right-aligned unless all are text, columns two spaces apart.

#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    all_left: bool,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Table {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            all_left: false,
        }
    }

    /// A table of text: every column left-aligned.
    pub fn text<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Table {
        Table {
            all_left: true,
            ..Table::new(headers)
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut push_line = |line: &[String]| {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                let pad = width - cell.chars().count();
                if i > 0 {
                    text.push_str("  ");
                }
                if i == 0 || self.all_left {
                    text.push_str(cell);
                    text.extend(std::iter::repeat_n(' ', pad));
                } else {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        push_line(&self.headers);
        for row in &self.rows {
            push_line(row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_column_is_left_aligned_and_the_rest_right_aligned() {
        let mut t = Table::new(["op", "median", "ratio"]);
        t.row(["RunPodSandbox", "1.2ms", "0.25x"]);
        t.row(["ExecSync", "850us", "-"]);
        assert_eq!(
            t.render(),
            "op             median  ratio\n\
             RunPodSandbox   1.2ms  0.25x\n\
             ExecSync        850us      -\n"
        );
    }

    #[test]
    fn short_rows_are_padded_and_trailing_space_trimmed() {
        let mut t = Table::new(["a", "b"]);
        t.row(["long name"]);
        assert_eq!(t.render(), "a          b\nlong name\n");
        assert!(!t.is_empty());
    }

    #[test]
    fn text_tables_align_every_column_left() {
        let mut t = Table::text(["name", "url"]);
        t.row(["berth", "unix:///a.sock"]);
        t.row(["containerd", "unix:///b"]);
        assert_eq!(
            t.render(),
            "name        url\n\
             berth       unix:///a.sock\n\
             containerd  unix:///b\n"
        );
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(["x", "y"]);
        t.row(["µ", "1"]);
        assert_eq!(t.render(), "x  y\nµ  1\n");
    }
}
