//! The report's SVG: requests/s and p99 latency per target for the headline row.

use std::path::Path;

use plotters::prelude::*;

/// `rows`: (row, target, req/s, p99 ms). Charts the first row's targets.
pub(crate) fn draw(path: &Path, rows: &[(String, String, f64, Option<f64>)]) -> Result<(), String> {
    let Some(first) = rows.first().map(|r| r.0.clone()) else {
        return Ok(());
    };
    let data: Vec<&(String, String, f64, Option<f64>)> =
        rows.iter().filter(|r| r.0 == first).collect();
    let n = data.len() as u32;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(500);
    let max_rps = data.iter().map(|d| d.2).fold(1.0, f64::max) * 1.15;
    let max_p99 = data.iter().filter_map(|d| d.3).fold(0.1, f64::max) * 1.15;
    let label = |i: &SegmentValue<u32>| match i {
        SegmentValue::CenterOf(i) => data.get(*i as usize).map_or(String::new(), |d| short(&d.1)),
        _ => String::new(),
    };
    for (area, title, max, value) in [
        (
            &left,
            format!("{first}: requests/s"),
            max_rps,
            Box::new(|d: &&(String, String, f64, Option<f64>)| d.2)
                as Box<dyn Fn(&&(String, String, f64, Option<f64>)) -> f64>,
        ),
        (
            &right,
            "p99 latency, ms".to_owned(),
            max_p99,
            Box::new(|d: &&(String, String, f64, Option<f64>)| d.3.unwrap_or(0.0)),
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d((0u32..n.saturating_sub(1)).into_segmented(), 0f64..max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n as usize)
            .x_label_formatter(&label)
            .x_label_style(("sans-serif", 10))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style_func(|x, _| {
                        let i = match x {
                            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => *i as usize,
                            SegmentValue::Last => 0,
                        };
                        let name = data.get(i).map_or("", |d| d.1.as_str());
                        if name.starts_with("lb") {
                            BLUE.filled()
                        } else if name == "direct" {
                            GREEN.mix(0.6).filled()
                        } else {
                            RED.mix(0.6).filled()
                        }
                    })
                    .margin(6)
                    .data(data.iter().enumerate().map(|(i, d)| (i as u32, value(d)))),
            )
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Bar labels short enough to sit side by side (an `--lb-bin` label or "(log off)" kept).
fn short(target: &str) -> String {
    let mut s = target.replace(" (log off)", " -log");
    for (long, short) in [
        ("lb weighted-round-robin", "lb wrr"),
        ("lb round-robin", "lb rr"),
        ("lb least-connections", "lb lc"),
        ("lb p2c-ewma", "lb p2c"),
        ("lb consistent-hash", "lb hash"),
        ("lb random", "lb rand"),
    ] {
        if let Some(rest) = s.strip_prefix(long) {
            s = format!("{short}{rest}");
            break;
        }
    }
    s
}

/// `xtask chart REPORT.json OUT.svg`: redraws the chart of a saved report.
pub(crate) fn redraw(args: &[String]) -> Result<(), String> {
    let (Some(json), Some(out)) = (args.first(), args.get(1)) else {
        return Err("usage: xtask chart REPORT.json OUT.svg".into());
    };
    let text = std::fs::read_to_string(json).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let rows: Vec<(String, String, f64, Option<f64>)> = v
        .as_array()
        .ok_or("not a report")?
        .iter()
        .map(|s| {
            (
                s["row"].as_str().unwrap_or_default().to_owned(),
                s["target"].as_str().unwrap_or_default().to_owned(),
                s["rps"].as_f64().unwrap_or(0.0),
                s["p99_ms"].as_f64(),
            )
        })
        .collect();
    draw(Path::new(out), &rows)
}
