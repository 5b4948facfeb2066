//! pytorch-fid's statistics files: `.npz` archives (numpy's `savez` / `savez_compressed`)
//! holding `mu` (`float64`, `(d,)`) and `sigma` (`float64`, `(d, d)`).
//!
//! An `.npz` is a zip archive of `.npy` files: a magic string `\x93NUMPY`, a format version,
//! a little-endian header length, a Python-literal header (`{'descr': '<f8', 'fortran_order':
//! False, 'shape': (2048,), }`) and the raw values. Reading accepts format versions 1–3,
//! little-endian `float64` or `float32`, C or Fortran order, stored or deflated; writing
//! produces what `np.savez_compressed` does (version 1.0, `<f8`, C order, deflated).

use std::io::{Read, Write};
use std::path::Path;

use crate::frechet::Stats;
use crate::{QualityError, Result};

/// Reads `mu` and `sigma` from a pytorch-fid `.npz`.
///
/// # Errors
/// [`QualityError::Npz`] naming the file and what is wrong: not a zip, no `mu` or `sigma`, an
/// unsupported dtype, shapes that do not fit together.
pub fn read_stats(path: &Path) -> Result<Stats> {
    let bad = |reason: String| QualityError::Npz { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not an .npz (zip) archive: {e}")))?;
    let mut array = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let mut entry = archive.by_name(&format!("{name}.npy")).map_err(|_| {
            bad(format!("no `{name}` array (pytorch-fid statistics hold `mu` and `sigma`)"))
        })?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| bad(format!("`{name}`: {e}")))?;
        parse_npy(&bytes).map_err(|e| bad(format!("`{name}.npy`: {e}")))
    };
    let (mu_shape, mu) = array("mu")?;
    let (sigma_shape, sigma) = array("sigma")?;
    let d = mu.len();
    if mu_shape.len() != 1 || sigma_shape != [d, d] {
        return Err(bad(format!(
            "mu has shape {mu_shape:?} and sigma {sigma_shape:?}; expected ({d},) and ({d}, {d})"
        )));
    }
    Ok(Stats { mu, sigma })
}

/// Writes `stats` as `np.savez_compressed(path, mu=mu, sigma=sigma)` does.
///
/// # Errors
/// [`QualityError::Npz`] when the file cannot be written.
pub fn write_stats(path: &Path, stats: &Stats) -> Result<()> {
    stats.check()?;
    let bad = |reason: String| QualityError::Npz { path: path.to_path_buf(), reason };
    let file = std::fs::File::create(path).map_err(|e| bad(e.to_string()))?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let d = stats.dim();
    for (name, shape, values) in [("mu", vec![d], &stats.mu), ("sigma", vec![d, d], &stats.sigma)] {
        zip.start_file(format!("{name}.npy"), options).map_err(|e| bad(e.to_string()))?;
        zip.write_all(&npy_bytes(&shape, values)).map_err(|e| bad(e.to_string()))?;
    }
    zip.finish().map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// An `.npy` file (format 1.0, `<f8`, C order) of `values` with `shape`.
fn npy_bytes(shape: &[usize], values: &[f64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded with spaces to 64 bytes.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + values.len() * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Shape and values (as `f64`, C order) of an `.npy` file.
fn parse_npy(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f64>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy array (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-text header")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header.find(&format!("'{key}':")).ok_or(format!("header has no '{key}'"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let width = if descr.starts_with("'<f8'") {
        8
    } else if descr.starts_with("'<f4'") {
        4
    } else {
        let shown: String = descr.chars().take(8).collect();
        return Err(format!("dtype {shown} is not little-endian float64 or float32"));
    };
    let fortran = field("fortran_order")?.starts_with("True");
    let shape_text = field("shape")?;
    let close = shape_text.find(')').ok_or("malformed shape")?;
    let shape: Vec<usize> = shape_text[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| format!("shape {s}: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    if data.len() != n * width {
        return Err(format!(
            "{} data bytes for shape {shape:?} of {width}-byte floats",
            data.len()
        ));
    }
    let mut values: Vec<f64> = if width == 8 {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    } else {
        data.chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect()
    };
    if fortran && shape.len() == 2 {
        let (r, c) = (shape[0], shape[1]);
        values = (0..r * c).map(|k| values[(k % c) * r + k / c]).collect();
    } else if fortran && shape.len() > 2 {
        return Err("Fortran-order arrays of more than 2 dims are not supported".into());
    }
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_bytes_parse_back() {
        let values = [1.0, -2.5, 3.25, 4.0, 5.0, 6.0];
        let bytes = npy_bytes(&[2, 3], &values);
        assert_eq!((bytes.len() - values.len() * 8) % 64, 0);
        let (shape, back) = parse_npy(&bytes).unwrap();
        assert_eq!((shape, back), (vec![2, 3], values.to_vec()));
        let (shape, _) = parse_npy(&npy_bytes(&[5], &[0.0; 5])).unwrap();
        assert_eq!(shape, vec![5]);
        assert!(parse_npy(b"PK\x03\x04....").unwrap_err().contains("magic"));
    }
}
