//! The SVG of `gmem bench --plot`: conversion latency against range size, log-log, one
//! curve per layout and direction.

use super::Curve;

/// Where a legend label starts, right of the plot area.
const LEGEND_TEXT_X: f64 = 40.0;
/// The widest a legend character is drawn (11 px sans-serif).
const LEGEND_CHAR_W: f64 = 7.0;

/// Conversion latency curves as an SVG (log-log).
pub fn svg(curves: &[Curve]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 480.0;
    const L: f64 = 70.0;
    const R: f64 = 230.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    let pts: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter())
        .filter(|p| p.1 > 0.0)
        .map(|&(x, y)| ((x as f64).log10(), y.log10()))
        .collect();
    if pts.is_empty() {
        return String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"/>\n",
        );
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn(&(f64, f64)) -> f64| {
        pts.iter().map(sel).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::MAX, |p| p.0) - 0.2,
        fold(f64::max, f64::MIN, |p| p.0) + 0.2,
    );
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    let (y0, y1) = (
        fold(f64::min, f64::MAX, |p| p.1).floor(),
        fold(f64::max, f64::MIN, |p| p.1).ceil(),
    );
    let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 + 1.0));
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    // The canvas widens so that the longest legend label (11 px sans-serif, at most 7 px a
    // character) ends inside it.
    let longest = curves
        .iter()
        .map(|c| c.label.chars().count())
        .max()
        .unwrap_or(0);
    let width = W.max(W - R + LEGEND_TEXT_X + LEGEND_CHAR_W * longest as f64 + 10.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{H}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">conversion latency \
         (median) against range size, log-log</text>\n",
        (W - R + L) / 2.0
    );
    // Grid and axis labels at powers of ten (y) and of 2^... (x: decades of bytes).
    let mut y = y0;
    while y <= y1 + 1e-9 {
        let py = sy(y);
        s += &format!(
            "<line x1=\"{L}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            W - R,
            L - 6.0,
            py + 4.0,
            human_us(10f64.powf(y))
        );
        y += 1.0;
    }
    for &x in &xs {
        let px = sx(x);
        s += &format!(
            "<line x1=\"{px:.1}\" y1=\"{T}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            H - B,
            H - B + 16.0,
            human_bytes(10f64.powf(x))
        );
    }
    s += &format!(
        "<rect x=\"{L}\" y=\"{T}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" \
         stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">range \
         size</text>\n<text transform=\"translate(16,{:.1}) rotate(-90)\" \
         text-anchor=\"middle\">latency</text>\n",
        W - L - R,
        H - T - B,
        (W - R + L) / 2.0,
        H - 12.0,
        (H - B + T) / 2.0
    );
    let colors = [
        "#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a", "#9467bd", "#c5b0d5",
    ];
    for (i, c) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let dash = if i % 2 == 1 {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let path: Vec<String> = c
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(x, y)| format!("{:.1},{:.1}", sx((x as f64).log10()), sy(y.log10())))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n",
            path.join(" ")
        );
        for p in &path {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            s += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n");
        }
        let ly = T + 10.0 + 18.0 * i as f64;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" \
             stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            W - R + 10.0,
            W - R + 34.0,
            W - R + LEGEND_TEXT_X,
            ly + 4.0,
            xml_escape(&c.label)
        );
    }
    s += "</svg>\n";
    s
}

fn human_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.0} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.0} ms", us / 1e3)
    } else if us >= 1.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.0} ns", us * 1e3)
    }
}

fn human_bytes(b: f64) -> String {
    let b = b * 1.000_001;
    if b >= f64::from(1u32 << 30) {
        format!("{:.0} GiB", b / f64::from(1u32 << 30))
    } else if b >= f64::from(1u32 << 20) {
        format!("{:.0} MiB", b / f64::from(1u32 << 20))
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_and_log_scaled() {
        let curves = vec![Curve {
            label: "a <b>".into(),
            points: vec![(4096, 2.0), (1 << 30, 20_000.0)],
        }];
        let s = svg(&curves);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a &lt;b&gt;"));
        assert_eq!(s.matches("<polyline").count(), 1);
        assert!(svg(&[]).contains("<svg"));
    }

    /// Every legend label ends inside the canvas, however long.
    #[test]
    fn svg_legend_stays_inside_the_canvas() {
        let label = "two-backing+copy to_private unpopulated, every page touched".to_string();
        let curves = vec![Curve {
            label: label.clone(),
            points: vec![(4096, 2.0), (1 << 21, 200.0)],
        }];
        let s = svg(&curves);
        let attr = |tag: &str, name: &str| -> f64 {
            let at = s.find(tag).unwrap();
            let rest = &s[at..];
            let v = &rest[rest.find(&format!("{name}=\"")).unwrap() + name.len() + 2..];
            v[..v.find('"').unwrap()].parse().unwrap()
        };
        let width = attr("<svg", "width");
        // The plot area ends at 760 - 230 = 530; the legend text starts LEGEND_TEXT_X on.
        let text_x = attr(&format!("<text x=\"{:.1}\"", 530.0 + LEGEND_TEXT_X), "x");
        assert!(
            text_x + LEGEND_CHAR_W * label.len() as f64 <= width,
            "legend ends at {} > width {width}",
            text_x + LEGEND_CHAR_W * label.len() as f64
        );
    }
}
