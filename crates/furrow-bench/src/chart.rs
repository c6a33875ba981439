//! The run as a picture: acknowledged messages per second and p99 ACK
//! latency per interval, one above the other, as SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;
use crate::BenchError;

fn chart_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Chart(e.to_string())
}

/// Writes the chart of `report`'s timeline to `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let (top, bottom) = root.split_vertically(300);
    let t_max = report.timeline.last().map_or(1.0, |p| p.t_s).max(1.0);
    let title = format!(
        "furrow bench {:?} over {:?}, {} devices",
        report.mode, report.protocol, report.devices
    )
    .to_lowercase();

    let rate_max = report
        .timeline
        .iter()
        .map(|p| p.acked_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("acked msgs/s")
        .draw()
        .map_err(chart_err)?;
    c.draw_series(LineSeries::new(
        report.timeline.iter().map(|p| (p.t_s, p.acked_per_s)),
        &BLUE,
    ))
    .map_err(chart_err)?;

    let p99: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .filter_map(|p| p.p99_us.map(|us| (p.t_s, us as f64 / 1000.0)))
        .collect();
    let p99_max = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..p99_max)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("p99 ACK latency, ms")
        .draw()
        .map_err(chart_err)?;
    c.draw_series(LineSeries::new(p99, &RED))
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(())
}
