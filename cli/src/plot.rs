//! `crosscheck --plot`: the per-layer divergence of two backends as a heatmap PNG, drawn pixel by pixel.
//!
//! Rows are layers (numbered on the left), columns the tap kinds (ATTN = attn_out, MLP = mlp_out,
//! RES = residual); the final logits are one more row at the bottom, spanning every column. A cell's
//! colour is log10(NMSE) on a fixed scale from -12 (dark purple; NMSE 0 is drawn there too) to 0
//! (yellow), viridis-like. Cells past the threshold get a thick red outline; a tap holding NaN/Inf is
//! filled magenta (and outlined, since it fails too); a tap the graph lacks is grey. The legend bar on
//! the right carries the scale with ticks every 3 decades and the threshold as a red line.

use std::path::Path;

use anyhow::{Context, Result};

/// One heatmap cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell {
    /// The graph has no such tap.
    Missing,
    /// NMSE of the tap; `non_finite` when either side held NaN/Inf.
    Value { nmse: f64, non_finite: bool },
}

pub struct Heatmap {
    /// Column labels (short, upper case).
    pub columns: Vec<String>,
    /// One row per layer: its label (the layer number) and one cell per column.
    pub rows: Vec<(String, Vec<Cell>)>,
    /// The final logits, drawn as a last row spanning every column.
    pub logits: Cell,
    pub threshold: f64,
}

/// The fixed colour scale, in log10(NMSE).
pub const SCALE_MIN: f64 = -12.0;
pub const SCALE_MAX: f64 = 0.0;

// Layout, in pixels. Text is a 5x7 font drawn at FONT_SCALE.
const FONT_SCALE: usize = 2;
const GLYPH_W: usize = 5 * FONT_SCALE;
const GLYPH_H: usize = 7 * FONT_SCALE;
const ADVANCE: usize = GLYPH_W + FONT_SCALE;
pub const MARGIN: usize = 10;
/// Row labels: up to 6 characters ("LOGITS") and a gap.
pub const LABEL_W: usize = 6 * ADVANCE + 6;
pub const HEADER_H: usize = GLYPH_H + 8;
pub const CELL_W: usize = 56;
pub const CELL_H: usize = 18;
/// Space between the last layer and the logits row.
pub const LOGITS_GAP: usize = 6;
/// Space between the grid and the legend bar.
pub const LEGEND_GAP: usize = 16;
pub const BAR_W: usize = 16;
/// The tick labels right of the bar: a gap and up to 3 characters ("-12").
pub const TICKS_W: usize = 6 + 3 * ADVANCE;
/// The legend bar is never shorter than this.
pub const MIN_BAR_H: usize = 100;
const OUTLINE: usize = 3;

pub const WHITE: [u8; 3] = [255, 255, 255];
pub const BLACK: [u8; 3] = [0, 0, 0];
pub const RED: [u8; 3] = [230, 0, 0];
pub const MAGENTA: [u8; 3] = [255, 0, 255];
pub const GREY: [u8; 3] = [200, 200, 200];

/// Width and height of the image for `columns` columns and `layers` layers.
pub fn size(columns: usize, layers: usize) -> (usize, usize) {
    let grid_h = layers * CELL_H + LOGITS_GAP + CELL_H;
    (
        MARGIN + LABEL_W + columns * CELL_W + LEGEND_GAP + BAR_W + TICKS_W + MARGIN,
        MARGIN + HEADER_H + grid_h.max(MIN_BAR_H) + MARGIN,
    )
}

/// Viridis, sampled at five points and interpolated linearly; `t` in 0..=1.
pub fn colormap(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) } * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f64;
    let mut c = [0u8; 3];
    for (k, v) in c.iter_mut().enumerate() {
        *v = (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8;
    }
    c
}

/// Position of an NMSE on the scale, 0..=1 (NMSE 0 and anything below 1e-12 are 0).
pub fn scale_pos(nmse: f64) -> f64 {
    if nmse.is_nan() {
        return 1.0;
    }
    if nmse <= 0.0 {
        return 0.0;
    }
    ((nmse.log10() - SCALE_MIN) / (SCALE_MAX - SCALE_MIN)).clamp(0.0, 1.0)
}

/// An RGB image.
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![WHITE; w * h],
        }
    }
    #[cfg(test)]
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        self.px[y * self.w + x]
    }
    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                self.px[yy * self.w + xx] = c;
            }
        }
    }
    fn outline(&mut self, x: usize, y: usize, w: usize, h: usize, t: usize, c: [u8; 3]) {
        self.fill(x, y, w, t, c);
        self.fill(x, y + h - t, w, t, c);
        self.fill(x, y, t, h, c);
        self.fill(x + w - t, y, t, h, c);
    }
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (r, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        self.fill(
                            x + i * ADVANCE + col * FONT_SCALE,
                            y + r * FONT_SCALE,
                            FONT_SCALE,
                            FONT_SCALE,
                            c,
                        );
                    }
                }
            }
        }
    }
    fn text_right(&mut self, right: usize, y: usize, s: &str, c: [u8; 3]) {
        let w = s.chars().count() * ADVANCE - FONT_SCALE;
        self.text(right.saturating_sub(w), y, s, c);
    }
    fn text_center(&mut self, cx: usize, y: usize, s: &str, c: [u8; 3]) {
        let w = s.chars().count() * ADVANCE - FONT_SCALE;
        self.text(cx.saturating_sub(w / 2), y, s, c);
    }
}

/// Where things are drawn, for the renderer and for tests that read pixels back.
pub struct Layout {
    columns: usize,
    layers: usize,
}

impl Layout {
    pub fn new(columns: usize, layers: usize) -> Layout {
        Layout { columns, layers }
    }
    fn grid_x(&self) -> usize {
        MARGIN + LABEL_W
    }
    fn grid_y(&self) -> usize {
        MARGIN + HEADER_H
    }
    /// (x, y, w, h) of the cell of `layer` and `column`.
    pub fn cell(&self, layer: usize, column: usize) -> (usize, usize, usize, usize) {
        (
            self.grid_x() + column * CELL_W,
            self.grid_y() + layer * CELL_H,
            CELL_W,
            CELL_H,
        )
    }
    /// (x, y, w, h) of the logits row.
    pub fn logits(&self) -> (usize, usize, usize, usize) {
        (
            self.grid_x(),
            self.grid_y() + self.layers * CELL_H + LOGITS_GAP,
            self.columns * CELL_W,
            CELL_H,
        )
    }
    /// (x, y, w, h) of the legend bar.
    pub fn bar(&self) -> (usize, usize, usize, usize) {
        let grid_h = self.layers * CELL_H + LOGITS_GAP + CELL_H;
        (
            self.grid_x() + self.columns * CELL_W + LEGEND_GAP,
            self.grid_y(),
            BAR_W,
            grid_h.max(MIN_BAR_H),
        )
    }
    /// The bar's row at scale position `t` (0 at the bottom, 1 at the top).
    pub fn bar_y(&self, t: f64) -> usize {
        let (_, y, _, h) = self.bar();
        y + ((1.0 - t.clamp(0.0, 1.0)) * (h - 1) as f64).round() as usize
    }
}

/// Draw a cell: the colour of its NMSE inset by one pixel (white grid lines), outlined red past the
/// threshold.
fn draw_cell(c: &mut Canvas, rect: (usize, usize, usize, usize), cell: Cell, threshold: f64) {
    let (x, y, w, h) = (rect.0 + 1, rect.1 + 1, rect.2 - 2, rect.3 - 2);
    match cell {
        Cell::Missing => c.fill(x, y, w, h, GREY),
        Cell::Value { nmse, non_finite } => {
            let fill = if non_finite {
                MAGENTA
            } else {
                colormap(scale_pos(nmse))
            };
            c.fill(x, y, w, h, fill);
            if non_finite || nmse.is_nan() || nmse > threshold {
                c.outline(x, y, w, h, OUTLINE, RED);
            }
        }
    }
}

pub fn render(m: &Heatmap) -> Canvas {
    let (w, h) = size(m.columns.len(), m.rows.len());
    let l = Layout::new(m.columns.len(), m.rows.len());
    let mut c = Canvas::new(w, h);
    let text_dy = (CELL_H - GLYPH_H) / 2;
    for (j, name) in m.columns.iter().enumerate() {
        let (x, _, cw, _) = l.cell(0, j);
        c.text_center(x + cw / 2, MARGIN + 2, name, BLACK);
    }
    for (i, (label, cells)) in m.rows.iter().enumerate() {
        let (x, y, _, _) = l.cell(i, 0);
        c.text_right(x - 6, y + text_dy, label, BLACK);
        for (j, &cell) in cells.iter().enumerate().take(m.columns.len()) {
            draw_cell(&mut c, l.cell(i, j), cell, m.threshold);
        }
    }
    let lr = l.logits();
    c.text_right(lr.0 - 6, lr.1 + text_dy, "LOGITS", BLACK);
    draw_cell(&mut c, lr, m.logits, m.threshold);

    // Legend: the scale, top = 0, bottom = -12, ticks every 3 decades, the threshold as a red line.
    let (bx, by, bw, bh) = l.bar();
    for yy in by..by + bh {
        let t = 1.0 - (yy - by) as f64 / (bh - 1) as f64;
        c.fill(bx, yy, bw, 1, colormap(t));
    }
    c.text_center(bx + bw / 2, MARGIN + 2, "NMSE", BLACK);
    let mut e = SCALE_MAX as i32;
    while e >= SCALE_MIN as i32 {
        let t = (e as f64 - SCALE_MIN) / (SCALE_MAX - SCALE_MIN);
        let ty = l.bar_y(t);
        c.fill(bx + bw, ty, 4, 1, BLACK);
        let label_y = (ty.saturating_sub(GLYPH_H / 2)).clamp(by, by + bh - GLYPH_H);
        c.text(bx + bw + 6, label_y, &e.to_string(), BLACK);
        e -= 3;
    }
    if m.threshold > 0.0 {
        let ty = l.bar_y(scale_pos(m.threshold));
        let y0 = ty.saturating_sub(1).max(by);
        c.fill(bx - 4, y0, bw + 8, 3, RED);
    }
    c
}

pub fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), c.w as u32, c.h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("writing {}", path.display()))?;
    let data: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&data)
        .with_context(|| format!("writing {}", path.display()))?;
    w.finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The 5x7 glyph of `ch` (rows top to bottom, bit 4 = leftmost column); blank for characters the
/// font lacks.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(nmse: f64) -> Cell {
        Cell::Value {
            nmse,
            non_finite: false,
        }
    }

    fn centre(c: &Canvas, r: (usize, usize, usize, usize)) -> [u8; 3] {
        c.pixel(r.0 + r.2 / 2, r.1 + r.3 / 2)
    }

    /// The pixel just inside a cell's one-pixel grid line, where the red outline goes.
    fn edge(c: &Canvas, r: (usize, usize, usize, usize)) -> [u8; 3] {
        c.pixel(r.0 + r.2 / 2, r.1 + 1)
    }

    #[test]
    fn cells_take_the_colour_of_their_nmse_and_failures_are_outlined() {
        let m = Heatmap {
            columns: vec!["ATTN".into(), "MLP".into(), "RES".into()],
            rows: vec![
                ("0".into(), vec![v(1e-12), v(1e-6), v(1e-1)]),
                (
                    "1".into(),
                    vec![
                        v(0.0),
                        Cell::Value {
                            nmse: 1e-9,
                            non_finite: true,
                        },
                        Cell::Missing,
                    ],
                ),
            ],
            logits: v(1e-2),
            threshold: 1e-3,
        };
        let c = render(&m);
        assert_eq!((c.w, c.h), size(3, 2));
        let l = Layout::new(3, 2);
        // Below the threshold: the scale's colour, no outline.
        assert_eq!(centre(&c, l.cell(0, 0)), colormap(0.0));
        assert_eq!(edge(&c, l.cell(0, 0)), colormap(0.0));
        assert_eq!(centre(&c, l.cell(0, 1)), colormap(0.5));
        assert_eq!(edge(&c, l.cell(0, 1)), colormap(0.5));
        assert_eq!(centre(&c, l.cell(1, 0)), colormap(0.0), "NMSE 0");
        // Past it: the scale's colour inside a red outline.
        assert_eq!(centre(&c, l.cell(0, 2)), colormap(11.0 / 12.0));
        assert_eq!(edge(&c, l.cell(0, 2)), RED);
        assert_eq!(centre(&c, l.logits()), colormap(10.0 / 12.0));
        assert_eq!(edge(&c, l.logits()), RED);
        // NaN/Inf and missing taps.
        assert_eq!(centre(&c, l.cell(1, 1)), MAGENTA);
        assert_eq!(edge(&c, l.cell(1, 1)), RED);
        assert_eq!(centre(&c, l.cell(1, 2)), GREY);
        // The legend runs from yellow (top, NMSE 1) to purple (bottom) with the threshold in red.
        let (bx, by, bw, bh) = l.bar();
        assert_eq!(c.pixel(bx + bw / 2, by), colormap(1.0));
        assert_eq!(c.pixel(bx + bw / 2, by + bh - 1), colormap(0.0));
        assert_eq!(c.pixel(bx + bw / 2, l.bar_y(9.0 / 12.0)), RED);
        // The row labels are drawn: some black pixel left of each row.
        for i in 0..2 {
            let (x, y, _, h) = l.cell(i, 0);
            assert!((0..x).any(|xx| (y..y + h).any(|yy| c.pixel(xx, yy) == BLACK)));
        }
    }

    #[test]
    fn colour_scale_is_fixed_and_monotonic() {
        assert_eq!(colormap(0.0), [68, 1, 84]);
        assert_eq!(colormap(1.0), [253, 231, 37]);
        assert_eq!(scale_pos(0.0), 0.0);
        assert_eq!(scale_pos(1e-15), 0.0);
        assert!((scale_pos(1e-6) - 0.5).abs() < 1e-12);
        assert_eq!(scale_pos(10.0), 1.0);
        assert_eq!(scale_pos(f64::NAN), 1.0);
        // Brightness (sum of channels) grows along the scale.
        let lum = |t: f64| colormap(t).iter().map(|&x| x as u32).sum::<u32>();
        for i in 0..20 {
            assert!(lum(i as f64 / 20.0) <= lum((i + 1) as f64 / 20.0), "{i}");
        }
    }

    #[test]
    fn png_round_trips() {
        let m = Heatmap {
            columns: vec!["ATTN".into()],
            rows: vec![("0".into(), vec![v(1e-4)])],
            logits: v(1e-8),
            threshold: 1e-3,
        };
        let c = render(&m);
        let dir = std::env::temp_dir().join(format!("e4m3-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.png");
        write_png(&p, &c).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&p).unwrap());
        let mut r = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width as usize, info.height as usize), (c.w, c.h));
        let want: Vec<u8> = c.px.iter().flatten().copied().collect();
        assert_eq!(&buf[..info.buffer_size()], &want[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
