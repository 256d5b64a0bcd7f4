//! Opening the files users point the runtime at (checkpoint shards and configs, tokenizer
//! files, chat templates, profiles, plans, prompt lists): only regular files. A named
//! pipe, device or directory in their place is an error at once; reading a pipe would
//! block the command (or the server's start) forever.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading if it is a regular file. It is opened non-blocking and checked
/// through the open handle, so a pipe never blocks the open and nothing can be swapped in
/// between the check and the read (regular files ignore the flag).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not a regular file (a {})",
                if kind.is_dir() {
                    "directory"
                } else if kind.is_fifo() {
                    "named pipe"
                } else {
                    "device or socket"
                }
            ),
        ));
    }
    Ok(file)
}

/// The bytes of a regular file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The text of a regular file (UTF-8).
pub fn read_to_string(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    open_regular(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open() {
        let dir = std::env::temp_dir().join(format!("kimi-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "{}");
        let fifo = dir.join("pipe");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        // Returns at once (no writer ever opens the pipe).
        let err = read(&fifo).unwrap_err();
        assert!(err.to_string().contains("named pipe"), "{err}");
        let err = read(&dir).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
