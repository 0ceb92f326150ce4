//! `docs/benchmarks.svg`: harvest time against workload size, log-log, one line per
//! harvester, so the gap between them and the growth with size show at a glance.
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One harvester's points: (fds, milliseconds).
pub struct Series {
    pub name: &'static str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// The three harvesters' colours.
pub const BPF: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const PROCFS: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
pub const LSOF: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

/// The smallest and largest positive values (the only ones a log axis can show).
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(None, |acc: Option<(f64, f64)>, v| Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v)))))
}

/// Axis range padded to whole decades, so the log axis gets round labels.
fn decades(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = span(values)?;
    Some((10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0))))
}

/// Draws the series (points sorted by fds) and a dashed line at the 300 ns/fd target.
pub fn write_svg(path: &Path, series: &[Series]) -> Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    // A little room either side, so the end points are not cut by the frame.
    let (x_lo, x_hi) = span(all().map(|p| p.0)).ok_or_else(|| anyhow!("nothing to plot"))?;
    let (x_lo, x_hi) = (x_lo / 1.4, x_hi * 1.4);
    let target = |fds: f64| fds * 300e-6;
    let (y_lo, y_hi) =
        decades(all().flat_map(|p| [p.1 / 1.3, p.1 * 1.3]).chain([target(x_lo), target(x_hi)]))
            .ok_or_else(|| anyhow!("nothing to plot"))?;
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("plotting {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("crd harvest: time per workload size (log-log)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("fds harvested (all processes)")
        .y_desc("milliseconds (median)")
        .x_labels(6)
        .x_label_formatter(&|v| if *v >= 1000.0 { format!("{:.0}k", v / 1000.0) } else { format!("{v:.0}") })
        .y_label_formatter(&|v| if *v < 1.0 { format!("{v}") } else { format!("{v:.0}") })
        .draw()
        .map_err(err)?;
    for s in series {
        let mut points = s.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let color = s.color;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(4))
            .map_err(err)?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    let grey = RGBColor(0x80, 0x80, 0x80);
    chart
        .draw_series(DashedLineSeries::new(
            [(x_lo, target(x_lo)), (x_hi, target(x_hi))],
            6,
            4,
            grey.stroke_width(1),
        ))
        .map_err(err)?
        .label("target for BPF: 300 ns per fd")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_decade_padding() {
        assert_eq!(span([3.0, 0.0, 1.0, f64::NAN].into_iter()), Some((1.0, 3.0)));
        assert_eq!(decades([10_000.0, 100_000.0].into_iter()), Some((10_000.0, 100_000.0)));
        assert_eq!(decades([15_000.0, 18_000.0].into_iter()), Some((10_000.0, 100_000.0)));
        assert_eq!(decades([0.3, 2500.0, 0.0, f64::NAN].into_iter()), Some((0.1, 10_000.0)));
        assert_eq!(decades(std::iter::empty()), None);
    }

    #[test]
    fn writes_an_svg_with_every_series() {
        let path = std::env::temp_dir().join(format!("xtask-plot-{}.svg", std::process::id()));
        let series = [
            Series { name: "BPF", color: BPF, points: vec![(10_000.0, 1.0), (100_000.0, 12.0)] },
            Series { name: "procfs", color: PROCFS, points: vec![(10_000.0, 40.0), (100_000.0, 500.0)] },
        ];
        write_svg(&path, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::copy(&path, "/tmp/plot-test.svg");
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        // Text elements hold their string on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for label in ["BPF", "procfs", "target for BPF: 300 ns per fd", "100k"] {
            assert!(texts.contains(&label), "no {label:?} in {svg}");
        }
        for color in ["#1F77B4", "#FF7F0E"] {
            assert!(
                svg.contains(&format!("<polyline fill=\"none\" opacity=\"1\" stroke=\"{color}\"")),
                "{svg}"
            );
        }
    }
}
