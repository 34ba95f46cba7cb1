//! Parsing `lvm lvs --reportformat json --units b --nosuffix` output (pure, no I/O).
//!
//! lvm2's JSON report is `{"report": [{"lv": [{"lv_name": "...", ...}, ...]}]}`; every
//! field is a string, numbers included (`"lv_size":"67108864"`, `"data_percent":"12.50"`,
//! `""` when a field does not apply). [`LvRow`] is that row as written; [`Lv`] is the
//! checked, typed form the backend works with.

use serde::Deserialize;

/// The fields the backend asks `lvs` for, in `-o` syntax.
pub const LVS_FIELDS: &str = "lv_name,vg_name,lv_attr,lv_size,pool_lv,data_percent,lv_tags";

/// The whole document.
#[derive(Debug, Deserialize)]
pub struct LvsReport {
    pub report: Vec<ReportSection>,
}

/// One report section (one per command for `lvs`).
#[derive(Debug, Deserialize)]
pub struct ReportSection {
    #[serde(default)]
    pub lv: Vec<LvRow>,
}

/// One LV as lvm prints it: all strings.
#[derive(Debug, Deserialize)]
pub struct LvRow {
    pub lv_name: String,
    #[serde(default)]
    pub vg_name: String,
    #[serde(default)]
    pub lv_attr: String,
    pub lv_size: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub data_percent: String,
    #[serde(default)]
    pub lv_tags: String,
}

/// What kind of LV a row is, from the first character of `lv_attr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvKind {
    /// `t`: a thin pool.
    ThinPool,
    /// `V`: a thin volume.
    ThinVolume,
    /// Anything else (linear, internal `_tdata`, ...).
    Other,
}

/// A checked LV.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub name: String,
    pub vg: String,
    pub kind: LvKind,
    pub size_bytes: u64,
    /// The thin pool a thin volume lives in (empty otherwise).
    pub pool_lv: String,
    /// Data usage of a thin pool or thin volume, in percent.
    pub data_percent: Option<f64>,
    pub tags: Vec<String>,
}

impl Lv {
    /// Whether Tandem created this LV (it carries the `tandem` tag).
    pub fn is_tandem(&self) -> bool {
        self.tags.iter().any(|t| t == super::lvm_thin::TAG)
    }
}

/// Why a report could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("lvm printed JSON that is not an LV report")]
    Json(#[source] serde_json::Error),
    #[error("LV '{lv}': field {field} has unexpected value '{value}'")]
    Field {
        lv: String,
        field: &'static str,
        value: String,
    },
}

/// Parse a whole `lvs` JSON report into checked LVs.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>, ReportError> {
    let report: LvsReport = serde_json::from_str(json).map_err(ReportError::Json)?;
    report
        .report
        .into_iter()
        .flat_map(|section| section.lv)
        .map(Lv::try_from)
        .collect()
}

impl TryFrom<LvRow> for Lv {
    type Error = ReportError;

    fn try_from(row: LvRow) -> Result<Lv, ReportError> {
        let bad = |field, value: &str| ReportError::Field {
            lv: row.lv_name.clone(),
            field,
            value: value.to_string(),
        };
        // `--nosuffix` should leave plain digits; accept a trailing B in case it is absent.
        let size_text = row.lv_size.trim().trim_end_matches(['B', 'b']);
        let size_bytes = size_text
            .parse::<u64>()
            .map_err(|_| bad("lv_size", &row.lv_size))?;
        let data_percent = match row.data_percent.trim() {
            "" => None,
            text => Some(
                text.parse::<f64>()
                    .ok()
                    .filter(|p| p.is_finite() && *p >= 0.0)
                    .ok_or_else(|| bad("data_percent", &row.data_percent))?,
            ),
        };
        let kind = match row.lv_attr.chars().next() {
            Some('t') => LvKind::ThinPool,
            Some('V') => LvKind::ThinVolume,
            _ => LvKind::Other,
        };
        let tags = row
            .lv_tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        Ok(Lv {
            name: row.lv_name,
            vg: row.vg_name,
            kind,
            size_bytes,
            pool_lv: row.pool_lv,
            data_percent,
            tags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lvm lvs --reportformat json --units b --nosuffix -o <LVS_FIELDS> vg_nvme` on a VG
    /// with a 1 GiB thin pool, one Tandem volume, one foreign thin LV and a linear LV.
    const SAMPLE: &str = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"other", "vg_name":"vg_nvme", "lv_attr":"Vwi-a-tz--", "lv_size":"8388608", "pool_lv":"thin", "data_percent":"0.00", "lv_tags":""},
                  {"lv_name":"root", "vg_name":"vg_nvme", "lv_attr":"-wi-ao----", "lv_size":"4194304", "pool_lv":"", "data_percent":"", "lv_tags":""},
                  {"lv_name":"thin", "vg_name":"vg_nvme", "lv_attr":"twi-aotz--", "lv_size":"1073741824", "pool_lv":"", "data_percent":"12.50", "lv_tags":""},
                  {"lv_name":"v1", "vg_name":"vg_nvme", "lv_attr":"Vwi-a-tz--", "lv_size":"67108864", "pool_lv":"thin", "data_percent":"3.13", "lv_tags":"backup,tandem"}
              ]
          }
      ]
  }
"#;

    #[test]
    fn a_realistic_report_parses() {
        let lvs = parse_lvs(SAMPLE).unwrap();
        assert_eq!(lvs.len(), 4);
        let pool = lvs.iter().find(|lv| lv.name == "thin").unwrap();
        assert_eq!(pool.kind, LvKind::ThinPool);
        assert_eq!(pool.size_bytes, 1 << 30);
        assert_eq!(pool.data_percent, Some(12.5));
        let v1 = lvs.iter().find(|lv| lv.name == "v1").unwrap();
        assert_eq!(v1.kind, LvKind::ThinVolume);
        assert_eq!(v1.size_bytes, 64 << 20);
        assert_eq!(v1.pool_lv, "thin");
        assert_eq!(v1.tags, vec!["backup", "tandem"]);
        assert!(v1.is_tandem());
        let root = lvs.iter().find(|lv| lv.name == "root").unwrap();
        assert_eq!(root.kind, LvKind::Other);
        assert_eq!(root.data_percent, None);
        assert!(!lvs
            .iter()
            .find(|lv| lv.name == "other")
            .unwrap()
            .is_tandem());
    }

    #[test]
    fn an_empty_vg_and_a_log_section_parse() {
        let json = r#"{"report":[{"lv":[]}],"log":[{"log_seq_num":"1","log_type":"status","log_context":"shell","log_object_type":"cmd","log_object_name":"","log_object_id":"","log_object_group":"","log_object_group_id":"","log_message":"success","log_errno":"0","log_ret_code":"1"}]}"#;
        assert!(parse_lvs(json).unwrap().is_empty());
    }

    #[test]
    fn bad_numbers_are_reported_with_the_lv() {
        let json = r#"{"report":[{"lv":[{"lv_name":"v1","lv_size":"64.00m"}]}]}"#;
        let e = parse_lvs(json).unwrap_err().to_string();
        assert_eq!(e, "LV 'v1': field lv_size has unexpected value '64.00m'");
        let json = r#"{"report":[{"lv":[{"lv_name":"t","lv_size":"1","data_percent":"x"}]}]}"#;
        assert!(parse_lvs(json).is_err());
        assert!(parse_lvs("WARNING: not json").is_err());
    }
}
