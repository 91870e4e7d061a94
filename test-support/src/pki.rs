//! Test certificates, made with the openssl CLI (installed by
//! `scripts/setup.sh`).
use std::{fs, io, path::Path, process::Command};

/// Runs the openssl CLI in `dir`; a failure carries its stderr.
fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("openssl (scripts/setup.sh installs it): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

/// A test CA and one leaf certificate per name (P-256, valid two days),
/// made with the openssl CLI in `dir`: `ca.pem`, and `NAME.pem` /
/// `NAME.key` for each name (the name is the leaf's only DNS SAN).
pub fn test_certs(dir: &Path, names: &[&str]) -> io::Result<()> {
    let run = |args: &[&str]| openssl(dir, args);
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=gateway test CA"]);
    run(&ca)?;
    for n in names {
        let (key, csr, pem, ext) = (format!("{n}.key"), format!("{n}.csr"), format!("{n}.pem"), format!("{n}.ext"));
        let subj = format!("/CN={n}");
        let mut req = vec!["req"];
        req.extend_from_slice(&ec);
        req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&req)?;
        fs::write(dir.join(&ext), format!("subjectAltName=DNS:{n}\n"))?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])?;
    }
    Ok(())
}

/// `name.pem`/`name.key` in `dir`, signed by the CA `test_certs` made
/// there, valid only from `start` to `end` (`YYYYMMDDHHMMSSZ`): certificates
/// that are expired, or not valid yet, today (`openssl ca` takes explicit dates).
pub fn dated_cert(dir: &Path, name: &str, start: &str, end: &str) -> io::Result<()> {
    let db = dir.join(format!("{name}.db"));
    fs::create_dir_all(&db)?;
    fs::write(db.join("index.txt"), "")?;
    fs::write(db.join("serial"), "1000\n")?;
    let cnf = dir.join(format!("{name}.cnf"));
    fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = t\n[t]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\n\
             default_md = sha256\npolicy = p\nx509_extensions = x\n[p]\ncommonName = supplied\n[x]\nsubjectAltName = DNS:{name}\n",
            d = db.display()
        ),
    )?;
    let cnf = cnf.to_str().ok_or_else(|| io::Error::other("a temporary path that is not UTF-8"))?;
    let (key, csr, pem, subj) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
    for args in [
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ],
        vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            cnf,
            "-cert",
            "ca.pem",
            "-keyfile",
            "ca.key",
            "-in",
            &csr,
            "-out",
            &pem,
            "-startdate",
            start,
            "-enddate",
            end,
        ],
    ] {
        openssl(dir, &args)?;
    }
    Ok(())
}
