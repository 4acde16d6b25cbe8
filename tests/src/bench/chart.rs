//! `docs/bench.png`: requests/s and p99 of every scenario relative to direct, per workload.
//! Text uses DejaVu Sans from Debian's `fonts-dejavu-core`, loaded at run time.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::{find, Cell};
use super::run::{Scenario, Workload};

/// Debian's `fonts-dejavu-core`.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0x2a, 0x6b, 0x3a),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0x76, 0xb7, 0xb2),
];

/// The proxied scenarios shown (direct is the 1.0 line).
/// The L7 rows (HTTP only) come last so the TCP groups have no gaps.
const SHOWN: [Scenario; 8] = [
    Scenario::IptSockmesh,
    Scenario::Ebpf,
    Scenario::EbpfAccel,
    Scenario::EnvoyEbpf,
    Scenario::EnvoyIpt,
    Scenario::Haproxy,
    Scenario::IptSockmeshL7,
    Scenario::EbpfL7,
];

fn short(wl: Workload) -> String {
    wl.label().replace("TCP RR ", "RR ").replace("HTTP 1KiB", "HTTP")
}

/// Writes the chart to `path`.
pub fn render(cells: &[Cell], path: &Path) -> Result<()> {
    let font =
        std::fs::read(FONT).with_context(|| format!("read {FONT} (apt-get install fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut wls: Vec<Workload> = cells
        .iter()
        .map(|c| c.workload)
        .filter(|w| matches!(w, Workload::Rr { .. } | Workload::Http))
        .collect();
    wls.dedup();
    let scs: Vec<Scenario> = SHOWN
        .into_iter()
        .filter(|s| cells.iter().any(|c| c.scenario == *s))
        .collect();
    let root = BitMapBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(750);
    panel(
        &left,
        "requests/s relative to direct (higher is better)",
        cells,
        &wls,
        &scs,
        |c, d| (d.rate > 0.0).then(|| c.rate / d.rate),
    )?;
    panel(
        &right,
        "p99 latency relative to direct (lower is better)",
        cells,
        &wls,
        &scs,
        |c, d| (d.p99_us > 0.0).then(|| c.p99_us / d.p99_us),
    )?;
    root.present()
        .map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    cells: &[Cell],
    wls: &[Workload],
    scs: &[Scenario],
    value: impl Fn(&Cell, &Cell) -> Option<f64>,
) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("chart: {e}");
    let mut vals = Vec::new();
    for (i, wl) in wls.iter().enumerate() {
        let Some(d) = find(cells, Scenario::Direct, *wl) else {
            continue;
        };
        for (j, sc) in scs.iter().enumerate() {
            if let Some(v) = find(cells, *sc, *wl).and_then(|c| value(c, d)) {
                vals.push((i, j, v));
            }
        }
    }
    // Headroom above the tallest bar keeps the legend clear of the bars and the 1.0 line.
    let ymax = vals.iter().map(|v| v.2).fold(1.0f64, f64::max) * 1.45;
    let n = wls.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(e)?;
    let names: Vec<String> = wls.iter().map(|w| short(*w)).collect();
    let fmt = move |x: &f64| {
        let i = x.floor();
        if (x - i - 0.5).abs() < 1e-6 && (i as usize) < names.len() {
            names[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&fmt)
        .y_label_formatter(&|y| format!("{y:.1}x"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    let k = scs.len().max(1) as f64;
    let w = 0.84 / k;
    for (j, sc) in scs.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = vals
            .iter()
            .filter(|v| v.1 == j)
            .map(|&(i, _, v)| {
                let x0 = i as f64 + 0.08 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, v)], color.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(e)?
            .label(sc.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (n as f64, 1.0)],
            BLACK.stroke_width(2),
        )))
        .map_err(e)?
        .label("direct = 1.0")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}
