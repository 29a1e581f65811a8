//! Reading and writing the user's files safely. Only regular files are opened (opening a
//! FIFO blocks until something writes to it, a device may never end, a folder is not a file);
//! text files (configs, vocabularies, indexes) are read only up to a size no real one reaches;
//! outputs are written atomically, and can be checked for writability before any work.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest config, vocabulary or index file read: 256 MiB (CLIP's `vocab.json` is 1 MiB,
/// a `tokenizer.json` a few).
pub const MAX_TEXT_FILE: u64 = 256 << 20;

fn io_error(path: &Path, kind: std::io::ErrorKind, message: String) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(kind, message),
    }
}

/// The file at `path` opened for reading, if it is a regular file (after following links),
/// without blocking on a FIFO or reading a device.
///
/// # Errors
/// [`Error::Io`] naming `path` if it does not exist, cannot be opened, or is a folder, a FIFO,
/// a socket or a device.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a folder"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            format!("{what}, where a file was expected"),
        ));
    }
    let file = File::open(path).map_err(io)?;
    // The path may have been replaced between the two calls.
    if !file.metadata().map_err(io)?.is_file() {
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "not a regular file".into(),
        ));
    }
    Ok(file)
}

/// The bytes of the regular file at `path`, of at most [`MAX_TEXT_FILE`].
///
/// # Errors
/// As [`open_regular`]; [`Error::Io`] for a larger file or a read error.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_TEXT_FILE {
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_TEXT_FILE} bytes: not a config or vocabulary file"),
        ));
    }
    Ok(bytes)
}

/// The UTF-8 text of the regular file at `path`, of at most [`MAX_TEXT_FILE`] bytes.
///
/// # Errors
/// As [`read_regular`]; [`Error::Io`] for text that is not UTF-8.
pub(crate) fn read_regular_string(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|e| {
        io_error(
            path,
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {e}"),
        )
    })
}

/// Whether `path` names a PyTorch pickle (`.pt`, `.bin`, `.ckpt`, `.pth`), which is never
/// unpickled here (loading one can run code), with the message that says so.
pub fn pickle_message(path: &Path) -> Option<String> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    ["pt", "bin", "ckpt", "pth"]
        .contains(&extension.as_str())
        .then(|| {
            "a PyTorch pickle, which is never unpickled here (it can run code): convert it to \
             .safetensors first (safetensors' convert script, or `torch.load` then \
             `safetensors.torch.save_file` in a trusted Python)"
                .to_owned()
        })
}

static TEMP_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is
/// flushed to the disk and then renamed over `path` (`replace`) or linked to it only if
/// `path` does not exist (not `replace`). A failure at any point (a full disk, say) leaves
/// `path` as it was and no temporary file behind.
///
/// # Errors
/// [`Error::Io`] naming `path`: an existing file without `replace` (`AlreadyExists`), a
/// folder that does not exist or cannot be written, and any write error.
pub(crate) fn write_atomic(
    path: &Path,
    replace: bool,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write;
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "not a file name".into(),
        )
    })?;
    if !replace && std::fs::symlink_metadata(path).is_ok() {
        return Err(io_error(
            path,
            std::io::ErrorKind::AlreadyExists,
            "exists already (not replaced)".into(),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(
        ".{}.{}-{n}.part",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(io)?;
    let written = (|| {
        let mut out = std::io::BufWriter::new(&file);
        write(&mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()
    })();
    drop(file);
    let placed = written.and_then(|()| {
        if replace {
            std::fs::rename(&temp, path)
        } else {
            // A hard link fails if `path` appeared meanwhile; then the temporary goes.
            std::fs::hard_link(&temp, path).and_then(|()| std::fs::remove_file(&temp))
        }
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(io(e));
    }
    // The rename itself reaches the disk with the folder's entry.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Checks, before any work, that `path` can be written: its folder exists and takes a new
/// file, and without `replace` no file is there yet.
///
/// # Errors
/// [`Error::Io`] naming `path`, as writing it would fail.
pub fn check_writable(path: &Path, replace: bool) -> Result<()> {
    if !replace && std::fs::symlink_metadata(path).is_ok() {
        return Err(io_error(
            path,
            std::io::ErrorKind::AlreadyExists,
            "exists already (not replaced)".into(),
        ));
    }
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(io_error(
            path,
            std::io::ErrorKind::InvalidInput,
            "is a folder".into(),
        ));
    }
    // A probe file in the same folder, removed again.
    let probe = path.with_file_name(format!(
        ".{}.probe-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sd-models-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failed_write_leaves_the_existing_file_and_no_temporary() {
        let d = dir("full");
        let path = d.join("out.png");
        std::fs::write(&path, b"the user's picture").unwrap();
        // The disk fills half-way through.
        let full = |w: &mut dyn std::io::Write| {
            w.write_all(&[0; 5000])?;
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left",
            ))
        };
        for replace in [true, false] {
            let e = write_atomic(&path, replace, full).unwrap_err();
            assert!(e.to_string().contains("out.png"), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), b"the user's picture");
            assert_eq!(entries(&d), ["out.png"]);
        }
        // Without replace, an existing file is refused before anything is written.
        let e = write_atomic(&path, false, |w| w.write_all(b"new")).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        // With it, the new content replaces the old whole.
        write_atomic(&path, true, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // A new file, and a failed new file leaves nothing.
        let fresh = d.join("fresh.png");
        write_atomic(&fresh, false, |w| w.write_all(b"x")).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"x");
        let e = write_atomic(&d.join("never.png"), false, full).unwrap_err();
        assert!(e.to_string().contains("never.png"), "{e}");
        assert_eq!(entries(&d), ["fresh.png", "out.png"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writability_is_checked_up_front() {
        let d = dir("check");
        check_writable(&d.join("a.png"), false).unwrap();
        assert_eq!(entries(&d), Vec::<String>::new());
        std::fs::write(d.join("a.png"), b"x").unwrap();
        assert!(check_writable(&d.join("a.png"), false).is_err());
        check_writable(&d.join("a.png"), true).unwrap();
        let e = check_writable(&d.join("missing/a.png"), true).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(check_writable(&d, true).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = dir("fifo");
        let fifo = d.join("config.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("no mkfifo here; skipped");
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_regular_string(&path).map(|_| ()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("reading a FIFO blocked");
        let e = result.unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_regular(&d).unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
