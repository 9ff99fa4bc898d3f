//! How kubelet writes a Secret (or ConfigMap) volume, step for step, so rotation can be
//! tested against the real layout without a cluster.
//!
//! kubelet's `AtomicWriter` (pkg/volume/util/atomic_writer.go) keeps the payload in a
//! timestamped directory `..2026_11_25_13_00_00.<random>`, points the symlink `..data` at it,
//! and exposes each key as a symlink `<key> -> ..data/<key>`. An update writes a new
//! timestamped directory, creates `..data_tmp` pointing at it, **renames** `..data_tmp` onto
//! `..data` (the one atomic step), adds user-visible symlinks for new keys, then removes the
//! old directory and the symlinks of keys that are gone.

use std::{
    os::unix::fs::symlink,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Writes `payload` (key, content) into the volume directory `dir` as kubelet does, first
/// write or update alike. Panics on an I/O error (test helper).
pub fn write_volume(dir: &Path, payload: &[(&str, &[u8])]) {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    std::fs::create_dir_all(dir).expect("creating the volume directory");
    let old = std::fs::read_link(dir.join(DATA)).ok();

    // 1. The payload, in a fresh timestamped directory (kubelet: os.MkdirTemp with the UTC
    //    time as the prefix; the random suffix is a counter here).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let ts = format!(
        "..{}.{:09}{:04}",
        utc_stamp(now.as_secs()),
        now.subsec_nanos(),
        SEQ.fetch_add(1, Ordering::Relaxed) % 10_000
    );
    let ts_dir = dir.join(&ts);
    std::fs::create_dir(&ts_dir).expect("creating the timestamped directory");
    for (key, content) in payload {
        std::fs::write(ts_dir.join(key), content).expect("writing a payload file");
    }

    // 2. The atomic step: ..data_tmp -> ts, renamed onto ..data.
    let _ = std::fs::remove_file(dir.join(DATA_TMP));
    symlink(&ts, dir.join(DATA_TMP)).expect("creating ..data_tmp");
    std::fs::rename(dir.join(DATA_TMP), dir.join(DATA)).expect("renaming ..data_tmp onto ..data");

    // 3. User-visible symlinks for keys that have none yet.
    for (key, _) in payload {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(key), &link).expect("creating a key symlink");
        }
    }

    // 4. The old payload and the symlinks of keys that are gone.
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("removing the old payload");
    }
    for entry in std::fs::read_dir(dir)
        .expect("listing the volume")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !payload.iter().any(|(k, _)| *k == name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `2026_11_25_13_00_00` for a Unix time (UTC; civil-from-days, proleptic Gregorian).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}_{month:02}_{day:02}_{:02}_{:02}_{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_civil_utc() {
        assert_eq!(utc_stamp(0), "1970_01_01_00_00_00");
        assert_eq!(utc_stamp(1_795_000_000), "2026_11_18_11_06_40");
        assert_eq!(utc_stamp(951_782_400), "2000_02_29_00_00_00");
    }

    #[test]
    fn an_update_swaps_data_and_removes_the_old_payload() {
        let dir = std::env::temp_dir().join(format!("sidecar-kubelet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_volume(&dir, &[("a", b"1"), ("b", b"1")]);
        let first = std::fs::read_link(dir.join(DATA)).unwrap();
        write_volume(&dir, &[("a", b"2")]);
        let second = std::fs::read_link(dir.join(DATA)).unwrap();
        assert_ne!(first, second);
        assert!(!dir.join(&first).exists(), "old payload removed");
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        assert!(
            std::fs::symlink_metadata(dir.join("b")).is_err(),
            "gone key"
        );
        assert_eq!(
            std::fs::read_link(dir.join("a")).unwrap(),
            Path::new("..data/a")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
