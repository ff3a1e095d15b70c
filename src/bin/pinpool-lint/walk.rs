//! The files to check under a path: a file as named; a directory's `.rs` and `.sql` files.

use std::io;
use std::path::{Path, PathBuf};

/// The files under `path`, in name order, each with the error that kept its directory from
/// being read, if any. A file named directly is taken whatever its name; in a directory only
/// `.rs` and `.sql` files are, and hidden directories and `target/` are skipped.
pub fn files(path: &Path) -> io::Result<Vec<(PathBuf, Option<io::Error>)>> {
    let meta = std::fs::metadata(path)?;
    let mut out = Vec::new();
    if meta.is_dir() {
        walk(path, &mut out);
    } else {
        out.push((path.to_path_buf(), None));
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Option<io::Error>)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.push((dir.to_path_buf(), Some(e)));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        // Follows symbolic links to files; not to directories (no cycles).
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if !name.starts_with('.') && name != "target" {
                walk(&path, out);
            }
        } else if name.ends_with(".rs") || name.ends_with(".sql") {
            out.push((path, None));
        }
    }
}
