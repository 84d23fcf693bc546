//! The plots of the full run (and of `--quick --plots`): the sections draw
//! theirs ([`Section::plot`]) with the charts here, all of plotters in one
//! place. Text needs a font: plotters' `ab_glyph` backend renders a TTF
//! file read at run time (no system font library), so without one of the
//! usual DejaVu files the plots are skipped.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::BoxResult;
use crate::failover::Bin;
use crate::measure::{self, Series, Spread, quantile_us};
use crate::report::Section;
use crate::stampede::Stampede;

const FONT_FILES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const PERCENTILES: [(f64, &str); 6] = [
    (0.5, "p50"),
    (0.75, "p75"),
    (0.9, "p90"),
    (0.95, "p95"),
    (0.99, "p99"),
    (0.999, "p99.9"),
];

fn register_font() -> BoxResult<()> {
    let bytes = FONT_FILES
        .iter()
        .find_map(|f| std::fs::read(f).ok())
        .ok_or("no DejaVuSans.ttf found (install fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| "the font file does not parse")?;
    Ok(())
}

/// Draws every section's plots into `dir`; returns the files written.
pub fn draw(dir: &Path, sections: &[Box<dyn Section>]) -> BoxResult<Vec<PathBuf>> {
    register_font()?;
    let mut files = Vec::new();
    for section in sections {
        files.extend(section.plot(dir)?);
    }
    Ok(files)
}

fn colour(id: &str) -> RGBColor {
    match id {
        "floor_redis" => RGBColor(90, 90, 90),
        "hit" => RGBColor(31, 119, 180),
        "hit_singleflight" => RGBColor(255, 127, 14),
        "hit_c_abi" => RGBColor(44, 160, 44),
        _ => RGBColor(214, 39, 40),
    }
}

/// Hit latency percentiles, floor vs library, at 1 and 50 threads.
pub fn latency(path: &Path, series: &[Series]) -> BoxResult<()> {
    let (root, panels) = canvas(
        path,
        "Cache hit latency percentiles: floor (pooled GET + serde_json) vs library",
    )?;
    let ids = ["floor_redis", "hit", "hit_singleflight", "hit_c_abi"];
    for (panel, threads) in panels.iter().zip([1, 50]) {
        let shown: Vec<&Series> = ids
            .iter()
            .filter_map(|id| measure::find(series, id, threads))
            .collect();
        let top = shown
            .iter()
            .map(|s| quantile_us(&s.pooled_ns, 0.999))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                if threads == 1 {
                    "1 thread (operations taking turns call by call)".to_owned()
                } else {
                    format!("{threads} threads (each operation alone)")
                },
                ("sans-serif", 18),
            )
            .margin(12)
            .margin_right(28)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.1f64..(PERCENTILES.len() - 1) as f64 + 0.3, 0f64..top)?;
        chart
            .configure_mesh()
            .x_labels(PERCENTILES.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 1e-6 || i < 0.0 {
                    return String::new();
                }
                PERCENTILES
                    .get(i as usize)
                    .map_or(String::new(), |p| p.1.to_owned())
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc("latency (µs)")
            .x_desc("percentile (all repetitions pooled)")
            .draw()?;
        for s in shown {
            let c = colour(s.id);
            let points: Vec<(f64, f64)> = PERCENTILES
                .iter()
                .enumerate()
                .map(|(i, (q, _))| (i as f64, quantile_us(&s.pooled_ns, *q)))
                .collect();
            line_with_points(
                &mut chart,
                points,
                c,
                format!("({}) {}", s.item, s.label),
                3,
            )?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// Every plot's canvas: a titled PNG of two panels side by side; returns
/// the area below the title (to `present`) and the panels.
fn canvas<'a>(path: &'a Path, title: &str) -> BoxResult<(Area<'a>, Vec<Area<'a>>)> {
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let panels = root.split_evenly((1, 2));
    Ok((root, panels))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A labelled line of width 2 with a dot of `radius` at each point.
fn line_with_points<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    points: Vec<(f64, f64)>,
    c: RGBColor,
    label: impl Into<String>,
    radius: i32,
) -> BoxResult<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
        .label(label)
        .legend(legend_line(c, 2));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, radius, c.filled())))?;
    Ok(())
}

/// A legend entry's sample: a short line of the series' colour and width.
fn legend_line(c: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
}

/// Every plot's legend: upper left, on a light box.
fn legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> BoxResult<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// Reads per bin from the kill, by where they were served: one panel per
/// failover scenario.
pub fn failover(path: &Path, scenarios: &[(&str, Vec<Bin>)]) -> BoxResult<()> {
    let (root, panels) = canvas(
        path,
        "Failover: reads per 250 ms by where they were served (master killed at 0 s)",
    )?;
    for ((title, bins), panel) in scenarios.iter().zip(panels.iter()) {
        let x0 = bins.first().map_or(-0.5, |b| b.at_s);
        let x1 = bins.last().map_or(1.0, |b| b.at_s + 0.25);
        let y1 = bins.iter().map(|b| b.reads).max().unwrap_or(1).max(1) as f64 * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(*title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..y1)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the kill")
            .y_desc("reads per 250 ms")
            .label_style(("sans-serif", 12))
            .draw()?;
        let line = |f: fn(&Bin) -> u64| -> Vec<(f64, f64)> {
            bins.iter().map(|b| (b.at_s + 0.125, f(b) as f64)).collect()
        };
        line_with_points(
            &mut chart,
            line(|b| b.hits),
            colour("hit"),
            "Redis (hits)",
            3,
        )?;
        line_with_points(
            &mut chart,
            line(|b| b.postgres),
            RGBColor(214, 39, 40),
            "Postgres",
            3,
        )?;
        line_with_points(
            &mut chart,
            line(|b| b.fail_safe),
            RGBColor(148, 103, 189),
            "fail-safe copy",
            2,
        )?;
        line_with_points(&mut chart, line(|b| b.errors), BLACK, "errors", 2)?;
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// Postgres queries and wall time vs N, naive vs single-flight.
pub fn stampede(path: &Path, stampedes: &[Stampede], one_load_ms: f64) -> BoxResult<()> {
    let (root, panels) = canvas(
        path,
        "Stampede on one cold key (50 ms load): naive vs single-flight",
    )?;
    let max_n = stampedes.iter().map(|s| s.n).max().unwrap_or(1) as f64;
    let max_q = stampedes
        .iter()
        .flat_map(|s| s.queries.iter().copied())
        .max()
        .unwrap_or(1) as f64;
    let max_wall = stampedes
        .iter()
        .flat_map(|s| s.wall_ms.iter().copied())
        .fold(1.0, f64::max);
    let paths = [
        (
            false,
            "naive (get_or_load_uncoalesced)",
            RGBColor(214, 39, 40),
        ),
        (true, "single-flight (get_or_load)", RGBColor(31, 119, 180)),
    ];

    let mut q = ChartBuilder::on(&panels[0])
        .caption("Postgres queries vs N (log scale)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_n * 1.05, (0.8f64..max_q * 1.5).log_scale())?;
    // Log axes: plotters' light grid lines bunch up into a grey band.
    q.configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("threads N")
        .y_desc("queries")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let mut w = ChartBuilder::on(&panels[1])
        .caption(
            "wall time vs N (median of repetitions, log scale)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0f64..max_n * 1.05,
            (one_load_ms * 0.8..max_wall * 1.5).log_scale(),
        )?;
    w.configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("threads N")
        .y_desc("wall (ms)")
        .draw()?;
    let grey = RGBColor(120, 120, 120);
    w.draw_series(LineSeries::new(
        [(0.0, one_load_ms), (max_n * 1.05, one_load_ms)],
        grey.stroke_width(1),
    ))?
    .label(format!("one load alone ({one_load_ms:.1} ms)"))
    .legend(legend_line(grey, 1));
    for (sf, label, c) in paths {
        let mine: Vec<&Stampede> = stampedes.iter().filter(|s| s.single_flight == sf).collect();
        let qp: Vec<(f64, f64)> = mine
            .iter()
            .map(|s| {
                (
                    s.n as f64,
                    Spread::of(s.queries.iter().map(|&q| q as f64)).median,
                )
            })
            .collect();
        let wp: Vec<(f64, f64)> = mine
            .iter()
            .map(|s| (s.n as f64, Spread::of(s.wall_ms.iter().copied()).median))
            .collect();
        line_with_points(&mut q, qp, c, label, 4)?;
        line_with_points(&mut w, wp, c, label, 4)?;
    }
    legend(&mut q)?;
    legend(&mut w)?;
    root.present()?;
    Ok(())
}
