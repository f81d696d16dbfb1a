//! The PNG of one simulated run: load, replicas per variant, and each band's TTFT p95 per
//! minute against its SLO, over the replay's time.
//!
//! Text uses DejaVu Sans from the system's fonts (Debian/Ubuntu `fonts-dejavu-core`) when it is
//! there; without it the chart is still drawn, unlabelled.
use super::config::AutoscaleConfig;
use super::sim::RunResult;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as "sans-serif" once; false if no font was found.
fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

pub fn write_png(path: &Path, cfg: &AutoscaleConfig, r: &RunResult) -> Result<(), String> {
    let text = font();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = if text {
        root.titled(
            &format!(
                "{}: {:.1} replica-hours, cost {:.0}, {} scale events",
                r.policy, r.replica_hours, r.cost, r.scale_events
            ),
            ("sans-serif", 24),
        )
        .map_err(|e| err(&e))?
    } else {
        root
    };
    let panels = root.split_evenly((3, 1));
    let minutes = r.minutes as f64;

    // 1: load.
    let max_load = r
        .timeline
        .iter()
        .map(|p| p.arrivals_per_s)
        .fold(1.0, f64::max);
    let mut c = panel(
        &panels[0],
        "arrivals (requests/s, all bands)",
        minutes,
        max_load * 1.1,
        text,
    )
    .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        r.timeline.iter().map(|p| (p.at_s / 60.0, p.arrivals_per_s)),
        &COLORS[0],
    ))
    .map_err(|e| err(&e))?;

    // 2: replicas per variant.
    let max_rep = r
        .timeline
        .iter()
        .flat_map(|p| p.replicas.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut c = panel(
        &panels[1],
        "replicas (ready + starting) per variant",
        minutes,
        max_rep * 1.15,
        text,
    )
    .map_err(|e| err(&e))?;
    for (vi, v) in cfg.variants.iter().enumerate() {
        let color = COLORS[(vi + 1) % COLORS.len()];
        let s = c
            .draw_series(LineSeries::new(
                r.timeline
                    .iter()
                    .map(|p| (p.at_s / 60.0, f64::from(p.replicas[vi]))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        if text {
            s.label(v.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        legend(&mut c).map_err(|e| err(&e))?;
    }

    // 3: TTFT p95 per minute against the SLO, per band that has one.
    let max_slo = cfg
        .bands
        .iter()
        .filter_map(|b| b.ttft_p95_s)
        .fold(0.1, f64::max);
    let top = max_slo * 2.5;
    let mut c = panel(
        &panels[2],
        "TTFT p95 per minute (s, clipped) — flat lines: SLOs",
        minutes,
        top,
        text,
    )
    .map_err(|e| err(&e))?;
    for (bi, b) in r.bands.iter().enumerate() {
        let Some(slo) = cfg.bands[bi].ttft_p95_s else {
            continue;
        };
        let color = COLORS[(bi + 2) % COLORS.len()];
        let s = c
            .draw_series(LineSeries::new(
                b.ttft_p95
                    .iter()
                    .enumerate()
                    .filter_map(|(m, x)| x.map(|x| (m as f64 + 0.5, x.min(top)))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
        if text {
            let att = b.attainment.unwrap_or(1.0) * 100.0;
            s.label(format!(
                "priority {} (SLO {slo} s, met {att:.1} % of minutes)",
                b.priority
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        c.draw_series(LineSeries::new(vec![(0.0, slo), (minutes, slo)], color))
            .map_err(|e| err(&e))?;
    }
    if text {
        legend(&mut c).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;
type PlotError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// One panel over the replay's minutes, `0..y_max` high; captioned, with a mesh, when `text`.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    minutes: f64,
    y_max: f64,
    text: bool,
) -> Result<Chart<'a, 'b>, PlotError> {
    let mut c = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(if text { 30 } else { 0 })
        .y_label_area_size(if text { 60 } else { 0 })
        .caption(if text { caption } else { "" }, ("sans-serif", 18))
        .build_cartesian_2d(0.0..minutes, 0.0..y_max)?;
    if text {
        c.configure_mesh().x_desc("minute").draw()?;
    }
    Ok(c)
}

/// The series' labels in a box.
fn legend<'a, 'b: 'a>(c: &mut Chart<'a, 'b>) -> Result<(), PlotError> {
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}
