//! Audio buffers: the common currency between backends, the long-text driver and encoders.
//!
//! Backends differ in sample rate and sample type; everything past the backend works on one
//! representation, mono `f32` in -1..=1 at a stated rate, so joining, resampling and
//! encoding are written once. Conversion to integers happens only at the edge, in
//! [`Audio::encode`].

use std::borrow::Cow;
use std::f64::consts::PI;
use std::io::Cursor;
use std::time::Duration;

use super::error::TtsError;
use super::request::AudioFormat;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Zero crossings of the sinc kernel on each side of the centre (at the passband rate).
/// 16 gives a stopband around -70 dB with the Blackman window, well below what a listener
/// notices in speech, at a cost of 32 multiply-adds per output sample when upsampling.
const ZERO_CROSSINGS: f64 = 16.0;

/// Fraction of the lower Nyquist frequency kept by the anti-aliasing filter; the rest is the
/// transition band, where a finite kernel cannot be sharp.
const PASSBAND: f64 = 0.95;

/// Most distinct kernel phases tabulated; rate pairs needing more use the nearest phase,
/// an error under 1/8192 of a sample.
const MAX_PHASES: u64 = 4096;

/// Mono audio as `f32` samples at a known rate.
///
/// Samples are nominally in -1..=1; values outside are kept (a later gain change may bring
/// them back) and only clamped when encoding to integers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Audio {
    /// Mono samples, nominally in -1..=1.
    pub samples: Vec<f32>,
    /// Samples per second, in Hz. A rate of 0 is meaningless; such audio has zero duration.
    pub sample_rate: u32,
}

impl Audio {
    /// Wraps existing samples.
    pub fn new(samples: Vec<f32>, sample_rate: u32) -> Self {
        Self {
            samples,
            sample_rate,
        }
    }

    /// Silence of `duration` (rounded to the nearest sample), e.g. the pause between
    /// sentences.
    pub fn silence(duration: Duration, sample_rate: u32) -> Self {
        let n = (duration.as_nanos() * u128::from(sample_rate) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
        Self::new(
            vec![0.0; usize::try_from(n).unwrap_or(usize::MAX)],
            sample_rate,
        )
    }

    /// Playing time, exact to the nanosecond (rounded down); zero for a zero rate.
    pub fn duration(&self) -> Duration {
        samples_to_duration(self.samples.len(), self.sample_rate)
    }

    /// True if there are no samples at all.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Root-mean-square level (0 for no samples): the loudness measure used to tell speech
    /// from silence, robust to a single click in a way the peak is not.
    pub fn rms(&self) -> f32 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let sum: f64 = self
            .samples
            .iter()
            .map(|&s| f64::from(s) * f64::from(s))
            .sum();
        (sum / self.samples.len() as f64).sqrt() as f32
    }

    /// Largest absolute sample value (0 for no samples).
    pub fn peak(&self) -> f32 {
        self.samples.iter().fold(0.0_f32, |m, s| m.max(s.abs()))
    }

    /// True if the [`rms`](Self::rms) level is at or below `threshold` — a backend that
    /// returns "audio" of this kind has failed quietly, and tests check for it.
    pub fn is_silent(&self, threshold: f32) -> bool {
        self.rms() <= threshold
    }

    /// Appends `other`, resampling it first if its rate differs from this audio's.
    ///
    /// Resampling rather than failing keeps joining total: the receiver's rate wins because
    /// it is the one the caller already committed to (for example the first sentence's).
    pub fn append(&mut self, other: &Audio) {
        if other.sample_rate == self.sample_rate {
            self.samples.extend_from_slice(&other.samples);
        } else {
            tracing::debug!(
                from = other.sample_rate,
                to = self.sample_rate,
                "resampling appended audio"
            );
            self.samples
                .extend_from_slice(&other.resample(self.sample_rate).samples);
        }
    }

    /// The same sound at `to_rate` Hz.
    ///
    /// Band-limited (windowed-sinc) interpolation: each output sample is a Blackman-windowed
    /// sinc sum over the input, with the cutoff at 95% of the *lower* of the two Nyquist
    /// frequencies. When downsampling that is the anti-aliasing low-pass (a 6 kHz whistle
    /// does not fold back into 8 kHz telephone audio as a 2 kHz one); when upsampling it
    /// removes the images that linear interpolation leaves as a metallic hiss. Kernels are
    /// tabulated per phase (the rates' ratio reduced by their gcd), so common pairs such as
    /// 22050→48000 cost one table and 32 multiply-adds per output sample. Each phase is
    /// normalised to unit gain, so a constant signal stays exactly constant.
    ///
    /// The output has `round(len * to / from)` samples, which keeps durations equal to
    /// within one output sample. A zero rate on either side gives empty audio.
    pub fn resample(&self, to_rate: u32) -> Audio {
        if to_rate == self.sample_rate {
            return self.clone();
        }
        if self.samples.is_empty() || to_rate == 0 || self.sample_rate == 0 {
            return Audio::new(Vec::new(), to_rate);
        }
        let from = u64::from(self.sample_rate);
        let to = u64::from(to_rate);
        let g = gcd(from, to);
        let (up, down) = (to / g, from / g);
        let len = self.samples.len() as u64;
        let out_len = (len * to + from / 2) / from;

        let cutoff = PASSBAND * (to as f64 / from as f64).min(1.0);
        let half = (ZERO_CROSSINGS / cutoff).ceil() as usize; // taps on each side
        let taps = 2 * half;
        let phases = up.min(MAX_PHASES);
        let table = kernel_table(phases as usize, half, cutoff);

        let x = &self.samples;
        let mut out = Vec::with_capacity(usize::try_from(out_len).unwrap_or(0));
        for n in 0..out_len {
            // Output sample n sits at input position n * down / up = i + rem / up.
            let pos = n * down;
            let mut i = pos / up;
            let rem = pos % up;
            let mut p = if phases == up {
                rem
            } else {
                (rem * phases + up / 2) / up
            };
            if p == phases {
                i += 1;
                p = 0;
            }
            let row = &table[p as usize * taps..(p as usize + 1) * taps];
            // Tap j multiplies input index i + j + 1 - half.
            let first = i as i64 + 1 - half as i64;
            let acc = if first >= 0 && first as u64 + taps as u64 <= len {
                // Interior: a plain dot product the compiler can vectorise.
                let window = &x[first as usize..first as usize + taps];
                row.iter().zip(window).map(|(w, s)| w * s).sum()
            } else {
                // Edges: samples before the start or past the end count as silence.
                let mut acc = 0.0_f32;
                for (j, w) in row.iter().enumerate() {
                    let k = first + j as i64;
                    if k >= 0 && (k as u64) < len {
                        acc += w * x[k as usize];
                    }
                }
                acc
            };
            out.push(acc);
        }
        Audio::new(out, to_rate)
    }

    /// Encodes the audio for delivery.
    ///
    /// WAV is 16-bit PCM mono (the format every player and browser accepts); the raw formats
    /// are little-endian with no header. Samples are clamped to -1..=1 first, and NaN becomes
    /// silence, so an overdriven model output clips instead of wrapping around into loud
    /// noise.
    pub fn encode(&self, format: AudioFormat) -> Result<Vec<u8>, TtsError> {
        match format {
            AudioFormat::Wav => self.encode_wav(),
            AudioFormat::PcmI16 => Ok(self
                .samples
                .iter()
                .flat_map(|&s| to_i16(s).to_le_bytes())
                .collect()),
            AudioFormat::PcmF32 => Ok(self
                .samples
                .iter()
                .flat_map(|&s| clamp_unit(s).to_le_bytes())
                .collect()),
        }
    }

    fn encode_wav(&self) -> Result<Vec<u8>, TtsError> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: self.sample_rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut cursor = Cursor::new(Vec::with_capacity(44 + 2 * self.samples.len()));
        let mut writer = hound::WavWriter::new(&mut cursor, spec).map_err(wav_error)?;
        for &s in &self.samples {
            writer.write_sample(to_i16(s)).map_err(wav_error)?;
        }
        writer.finalize().map_err(wav_error)?;
        Ok(cursor.into_inner())
    }
}

/// Decodes a WAV file into mono [`Audio`].
///
/// Accepts 8/16/24/32-bit integer and 32-bit float samples; several channels are averaged
/// into one, since speech output is mono. Programs that stream WAV to a pipe (such as
/// `espeak-ng --stdout`) cannot seek back to fill in the lengths and leave placeholders;
/// a data length running past the end of the bytes is therefore trimmed to what is there
/// instead of being an error.
pub fn decode_wav(bytes: &[u8]) -> Result<Audio, TtsError> {
    let bytes = repair_streamed_header(bytes);
    let mut reader = hound::WavReader::new(Cursor::new(bytes.as_ref())).map_err(wav_error)?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    if channels == 0 {
        return Err(TtsError::Audio("WAV declares zero channels".into()));
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(wav_error)?,
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / f64::from(1_u32 << (bits - 1));
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| (f64::from(v) * scale) as f32))
                .collect::<Result<_, _>>()
                .map_err(wav_error)?
        }
        (format, bits) => {
            return Err(TtsError::Audio(format!(
                "unsupported WAV sample layout: {bits}-bit {format:?}"
            )));
        }
    };
    let samples = if channels == 1 {
        interleaved
    } else {
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect()
    };
    Ok(Audio::new(samples, spec.sample_rate))
}

/// Converts a sample position at `sample_rate` into a time (rounded down to the nanosecond).
pub(crate) fn samples_to_duration(samples: usize, sample_rate: u32) -> Duration {
    if sample_rate == 0 {
        return Duration::ZERO;
    }
    let nanos = samples as u128 * NANOS_PER_SEC / u128::from(sample_rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

fn wav_error(e: hound::Error) -> TtsError {
    TtsError::Audio(format!("WAV: {e}"))
}

fn clamp_unit(s: f32) -> f32 {
    if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) }
}

fn to_i16(s: f32) -> i16 {
    // Symmetric scaling: -1.0 maps to -32767, so +1 and -1 are equally loud.
    (clamp_unit(s) * 32767.0).round() as i16
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `phases` rows of `2 * half` taps; row p interpolates at fractional position p / phases.
fn kernel_table(phases: usize, half: usize, cutoff: f64) -> Vec<f32> {
    let taps = 2 * half;
    let mut table = Vec::with_capacity(phases * taps);
    let mut row = vec![0.0_f64; taps];
    for p in 0..phases {
        let frac = p as f64 / phases as f64;
        for (j, w) in row.iter_mut().enumerate() {
            // Distance from the output position to input tap i + j + 1 - half.
            let d = frac + half as f64 - 1.0 - j as f64;
            *w = cutoff * sinc(cutoff * d) * blackman(d / half as f64);
        }
        let sum: f64 = row.iter().sum();
        let norm = if sum.abs() > 1e-12 { 1.0 / sum } else { 1.0 };
        table.extend(row.iter().map(|w| (w * norm) as f32));
    }
    table
}

fn sinc(x: f64) -> f64 {
    if x.abs() < 1e-12 {
        1.0
    } else {
        (PI * x).sin() / (PI * x)
    }
}

/// Blackman window on -1..=1 (zero outside).
fn blackman(u: f64) -> f64 {
    if u.abs() >= 1.0 {
        0.0
    } else {
        0.42 + 0.5 * (PI * u).cos() + 0.08 * (2.0 * PI * u).cos()
    }
}

/// Fixes the RIFF and data lengths of a WAV written to a pipe (see [`decode_wav`]); returns
/// the input untouched when nothing needs fixing or it is not a WAV file at all (hound then
/// reports the real problem).
fn repair_streamed_header(bytes: &[u8]) -> Cow<'_, [u8]> {
    let read_u32 = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Cow::Borrowed(bytes);
    }
    let mut pos = 12;
    let mut block_align = 1;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let Some(size) = read_u32(pos + 4) else { break };
        let body = pos + 8;
        if id == b"fmt "
            && let Some(b) = bytes.get(body + 12..body + 14)
        {
            block_align = usize::from(u16::from_le_bytes([b[0], b[1]])).max(1);
        }
        if id == b"data" {
            let available = bytes.len() - body;
            if size <= available {
                return Cow::Borrowed(bytes);
            }
            let fixed = available - available % block_align;
            tracing::debug!(
                declared = size,
                actual = fixed,
                "WAV data length runs past the end; using the bytes present"
            );
            let mut owned = bytes.to_vec();
            let riff = u32::try_from(bytes.len() - 8).unwrap_or(u32::MAX);
            owned[4..8].copy_from_slice(&riff.to_le_bytes());
            let data = u32::try_from(fixed).unwrap_or(u32::MAX);
            owned[pos + 4..pos + 8].copy_from_slice(&data.to_le_bytes());
            return Cow::Owned(owned);
        }
        let Some(next) = body.checked_add(size).and_then(|n| n.checked_add(size & 1)) else {
            break;
        };
        pos = next;
    }
    Cow::Borrowed(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f64, rate: u32, secs: f64, amp: f32) -> Audio {
        let n = (secs * f64::from(rate)).round() as usize;
        let samples = (0..n)
            .map(|i| amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin() as f32)
            .collect();
        Audio::new(samples, rate)
    }

    /// RMS over the middle of the buffer, away from filter edge effects.
    fn inner_rms(a: &Audio) -> f32 {
        let n = a.samples.len();
        Audio::new(a.samples[n / 4..3 * n / 4].to_vec(), a.sample_rate).rms()
    }

    #[test]
    fn duration_and_silence_are_sample_exact() {
        let a = Audio::new(vec![0.0; 22050], 22050);
        assert_eq!(a.duration(), Duration::from_secs(1));
        let s = Audio::silence(Duration::from_millis(250), 22050);
        assert_eq!(s.samples.len(), 5513); // 5512.5 rounds up
        assert!(s.samples.iter().all(|&x| x == 0.0));
        assert_eq!(Audio::silence(Duration::ZERO, 8000).samples.len(), 0);
        assert_eq!(Audio::new(vec![0.0; 3], 0).duration(), Duration::ZERO);
        assert_eq!(
            Audio::new(vec![0.0; 3], 48000).duration(),
            Duration::from_nanos(62_500)
        );
    }

    #[test]
    fn rms_peak_and_silence() {
        assert_eq!(Audio::new(vec![], 8000).rms(), 0.0);
        assert!(Audio::new(vec![], 8000).is_silent(0.0));
        let a = Audio::new(vec![0.5, -0.5, 0.5, -0.5], 8000);
        assert!((a.rms() - 0.5).abs() < 1e-6);
        assert_eq!(a.peak(), 0.5);
        assert!(!a.is_silent(0.01));
        assert!(Audio::silence(Duration::from_millis(10), 8000).is_silent(0.0));
        let s = sine(440.0, 16000, 1.0, 1.0);
        assert!((s.rms() - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3);
    }

    #[test]
    fn append_same_rate_concatenates() {
        let mut a = Audio::new(vec![0.1, 0.2], 8000);
        a.append(&Audio::new(vec![0.3], 8000));
        assert_eq!(a.samples, [0.1, 0.2, 0.3]);
        assert_eq!(a.sample_rate, 8000);
    }

    #[test]
    fn append_other_rate_resamples_to_the_receivers_rate() {
        let mut a = Audio::new(vec![0.0; 8000], 8000);
        a.append(&Audio::new(vec![0.25; 16000], 16000));
        assert_eq!(a.sample_rate, 8000);
        assert_eq!(a.samples.len(), 16000);
        assert_eq!(a.duration(), Duration::from_secs(2));
    }

    #[test]
    fn resample_keeps_duration_within_one_sample() {
        for (from, to) in [
            (22050, 48000),
            (48000, 8000),
            (24000, 16000),
            (16000, 44101),
        ] {
            let a = Audio::new(vec![0.0; 12345], from);
            let b = a.resample(to);
            assert_eq!(b.sample_rate, to);
            let diff = a.duration().as_secs_f64() - b.duration().as_secs_f64();
            assert!(diff.abs() <= 1.0 / f64::from(to), "{from}->{to}: {diff}");
        }
    }

    #[test]
    fn resample_same_rate_is_identity_and_empty_stays_empty() {
        let a = sine(100.0, 8000, 0.1, 0.5);
        assert_eq!(a.resample(8000), a);
        let e = Audio::new(vec![], 8000).resample(16000);
        assert!(e.is_empty());
        assert_eq!(e.sample_rate, 16000);
        assert!(!a.is_empty());
    }

    #[test]
    fn a_zero_rate_on_either_side_resamples_to_empty_audio() {
        let a = Audio::new(vec![0.5; 100], 16000);
        let to_zero = a.resample(0);
        assert!(to_zero.is_empty());
        assert_eq!(to_zero.sample_rate, 0);
        let from_zero = Audio::new(vec![0.5; 100], 0).resample(16000);
        assert!(from_zero.is_empty());
        assert_eq!(from_zero.sample_rate, 16000);
    }

    #[test]
    fn the_window_sinc_and_gcd_give_their_textbook_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(blackman(0.0), 1.0));
        assert!(close(blackman(0.5), 0.34));
        assert!(close(blackman(-0.5), 0.34));
        assert!(close(
            blackman(0.25),
            0.42 + 0.5 * std::f64::consts::FRAC_1_SQRT_2
        ));
        assert!(close(blackman(1.0), 0.0));
        assert!(close(blackman(-1.5), 0.0));
        assert!(close(sinc(0.0), 1.0));
        assert!(close(sinc(0.5), 2.0 / PI));
        assert!(sinc(1.0).abs() < 1e-15 && sinc(-2.0).abs() < 1e-15);
        assert_eq!(gcd(22050, 48000), 150);
        assert_eq!(gcd(48000, 22050), 150);
        assert_eq!(gcd(7, 0), 7);
        assert_eq!(gcd(44101, 16000), 1);
    }

    #[test]
    fn every_kernel_phase_has_unit_gain() {
        // Unnormalised, a short low-pass kernel's taps sum to well off 1.
        let (phases, half, cutoff) = (4, 4, 0.3);
        let raw: f64 = (0..2 * half)
            .map(|j| {
                let d = half as f64 - 1.0 - j as f64;
                cutoff * sinc(cutoff * d) * blackman(d / half as f64)
            })
            .sum();
        assert!((raw - 1.0).abs() > 0.05, "{raw}");
        let table = kernel_table(phases, half, cutoff);
        assert_eq!(table.len(), phases * 2 * half);
        for row in table.chunks(2 * half) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "{row:?}");
        }
        // Phase 0 sits on an input sample: its kernel is symmetric about that tap.
        assert!((table[half - 2] - table[half]).abs() < 1e-7);
    }

    #[test]
    fn samples_at_the_edges_are_weighed_as_in_the_middle() {
        // An impulse's response is the kernel wherever the impulse sits: at the start and
        // the end (where taps fall outside the input) as in the middle.
        let impulse_at = |k: usize| {
            let mut x = vec![0.0; 101];
            x[k] = 1.0;
            Audio::new(x, 8000).resample(16000).samples
        };
        let (start, middle, end) = (impulse_at(0), impulse_at(50), impulse_at(100));
        assert_eq!(start.len(), 202);
        let reach = 40; // beyond the kernel's half width (17 taps, 34 output samples)
        for n in 0..reach {
            assert!((start[n] - middle[100 + n]).abs() < 1e-7, "start {n}");
            assert!((end[200 - n] - middle[100 - n]).abs() < 1e-7, "end {n}");
        }
        assert!((end[201] - middle[101]).abs() < 1e-7);
        // On the sample itself the weight is the cutoff (0.95) over the phase's sum.
        assert!(start[0] > 0.9 && start[0] < 1.0, "{}", start[0]);
        assert!(start[1] > 0.5 && start[1] < 0.7, "{}", start[1]);
        assert!(middle[..100 - reach].iter().all(|&s| s.abs() < 1e-7));
    }

    #[test]
    fn an_input_shorter_than_the_kernel_resamples_whole() {
        for len in [1, 20, 34, 35] {
            let b = Audio::new(vec![0.5; len], 8000).resample(16000);
            assert_eq!(b.samples.len(), 2 * len);
            assert!(b.samples.iter().all(|s| s.is_finite() && s.abs() <= 0.6));
            assert!(b.samples[0] > 0.2, "{len}: {}", b.samples[0]);
        }
    }

    #[test]
    fn resample_preserves_a_constant_exactly_inside() {
        let a = Audio::new(vec![0.5; 4000], 22050);
        let b = a.resample(48000);
        let n = b.samples.len();
        for &s in &b.samples[100..n - 100] {
            assert!((s - 0.5).abs() < 1e-5, "{s}");
        }
    }

    #[test]
    fn upsampling_reproduces_a_sine_closely() {
        let a = sine(440.0, 22050, 0.5, 0.8);
        let b = a.resample(48000);
        let ideal = sine(440.0, 48000, 0.5, 0.8);
        let n = b.samples.len().min(ideal.samples.len());
        let err: f32 = (n / 4..3 * n / 4)
            .map(|i| (b.samples[i] - ideal.samples[i]).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "max error {err}");
    }

    #[test]
    fn downsampling_keeps_passband_and_removes_what_would_alias() {
        let speech_band = sine(1000.0, 48000, 0.5, 0.5).resample(8000);
        assert!((inner_rms(&speech_band) - 0.5 * std::f32::consts::FRAC_1_SQRT_2).abs() < 0.01);
        // 6 kHz cannot exist at 8 kHz; without the low-pass it would fold to 2 kHz.
        let alias = sine(6000.0, 48000, 0.5, 0.5).resample(8000);
        assert!(inner_rms(&alias) < 0.001, "{}", inner_rms(&alias));
    }

    #[test]
    fn awkward_rate_ratios_use_quantised_phases_and_still_work() {
        let a = sine(300.0, 16000, 0.3, 0.5);
        let b = a.resample(44101); // gcd 1: 44101 phases, more than the table holds
        let ideal = sine(300.0, 44101, 0.3, 0.5);
        let n = b.samples.len().min(ideal.samples.len());
        let err: f32 = (n / 4..3 * n / 4)
            .map(|i| (b.samples[i] - ideal.samples[i]).abs())
            .fold(0.0, f32::max);
        assert!(err < 2e-3, "max error {err}");
    }

    #[test]
    fn quantised_phases_round_to_the_nearest_so_nothing_is_delayed() {
        // 16000 -> 44101 Hz has more phases than the table: each output takes the nearest
        // tabulated one. Rounding (not truncating) leaves no systematic delay: the error's
        // projection on the signal's slope, a time shift, is well under the 1/8192 input
        // sample a truncation would add.
        let (freq, from, to) = (3000.0, 16000, 44101);
        let b = sine(freq, from, 0.5, 0.5).resample(to);
        let ideal = sine(freq, to, 0.5, 0.5);
        let n = b.samples.len().min(ideal.samples.len());
        let (mut along, mut norm) = (0.0_f64, 0.0_f64);
        for i in n / 4..3 * n / 4 {
            let t = i as f64 / f64::from(to);
            let slope = 0.5 * 2.0 * PI * freq * (2.0 * PI * freq * t).cos() / f64::from(from);
            along += f64::from(b.samples[i] - ideal.samples[i]) * slope;
            norm += slope * slope;
        }
        let delay = -along / norm; // in input samples
        assert!(delay.abs() < 3e-5, "delayed by {delay} input samples");
    }

    #[test]
    fn wav_round_trips_within_quantisation() {
        let a = sine(440.0, 22050, 0.1, 0.9);
        let bytes = a.encode(AudioFormat::Wav).unwrap();
        assert_eq!(&bytes[0..4], b"RIFF");
        assert_eq!(bytes.len(), 44 + 2 * a.samples.len());
        let b = decode_wav(&bytes).unwrap();
        assert_eq!(b.sample_rate, 22050);
        assert_eq!(b.samples.len(), a.samples.len());
        for (x, y) in a.samples.iter().zip(&b.samples) {
            assert!((x - y).abs() < 1.0 / 16000.0);
        }
    }

    #[test]
    fn pcm_encodings_are_little_endian_and_clamped() {
        let a = Audio::new(vec![0.0, 1.0, -1.0, 2.0, -3.0, f32::NAN, 0.5], 8000);
        let i16s = a.encode(AudioFormat::PcmI16).unwrap();
        let got: Vec<i16> = i16s
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(got, [0, 32767, -32767, 32767, -32767, 0, 16384]);
        let f32s = a.encode(AudioFormat::PcmF32).unwrap();
        let got: Vec<f32> = f32s
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got, [0.0, 1.0, -1.0, 1.0, -1.0, 0.0, 0.5]);
    }

    fn wav_with(
        spec: hound::WavSpec,
        write: impl FnOnce(&mut hound::WavWriter<&mut Cursor<Vec<u8>>>),
    ) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        let mut w = hound::WavWriter::new(&mut c, spec).unwrap();
        write(&mut w);
        w.finalize().unwrap();
        c.into_inner()
    }

    fn spec(channels: u16, bits: u16, format: hound::SampleFormat) -> hound::WavSpec {
        hound::WavSpec {
            channels,
            sample_rate: 16000,
            bits_per_sample: bits,
            sample_format: format,
        }
    }

    #[test]
    fn decodes_all_integer_widths() {
        use hound::SampleFormat::Int;
        let b8 = wav_with(spec(1, 8, Int), |w| {
            for v in [-128_i8, 0, 64] {
                w.write_sample(v).unwrap();
            }
        });
        assert_eq!(decode_wav(&b8).unwrap().samples, [-1.0, 0.0, 0.5]);
        let b24 = wav_with(spec(1, 24, Int), |w| {
            for v in [-(1 << 23), 0, 1 << 22] {
                w.write_sample(v).unwrap();
            }
        });
        assert_eq!(decode_wav(&b24).unwrap().samples, [-1.0, 0.0, 0.5]);
        let b32 = wav_with(spec(1, 32, Int), |w| {
            for v in [i32::MIN, 0, 1 << 30] {
                w.write_sample(v).unwrap();
            }
        });
        assert_eq!(decode_wav(&b32).unwrap().samples, [-1.0, 0.0, 0.5]);
    }

    #[test]
    fn decodes_float_and_downmixes_stereo() {
        let b = wav_with(spec(2, 32, hound::SampleFormat::Float), |w| {
            for v in [1.0_f32, 0.0, -0.5, -0.5, 0.25, 0.75] {
                w.write_sample(v).unwrap();
            }
        });
        let a = decode_wav(&b).unwrap();
        assert_eq!(a.samples, [0.5, -0.5, 0.5]);
        assert_eq!(a.sample_rate, 16000);
    }

    #[test]
    fn decodes_streamed_wav_with_placeholder_lengths() {
        let mut bytes = Audio::new(vec![0.5; 10], 22050)
            .encode(AudioFormat::Wav)
            .unwrap();
        // What espeak-ng --stdout writes: lengths it could not know.
        bytes[4..8].copy_from_slice(&0x7fff_f024_u32.to_le_bytes());
        bytes[40..44].copy_from_slice(&0x7fff_f000_u32.to_le_bytes());
        bytes.push(0); // half a sample at the end is dropped, not an error
        // The repaired header tells the truth: RIFF size is the file less 8 bytes, the data
        // its whole samples.
        let repaired = repair_streamed_header(&bytes);
        let field = |at: usize| u32::from_le_bytes(repaired[at..at + 4].try_into().unwrap());
        assert_eq!(field(4) as usize, bytes.len() - 8);
        assert_eq!(field(40), 20);
        let a = decode_wav(&bytes).unwrap();
        assert_eq!(a.samples.len(), 10);
        assert!((a.samples[0] - 0.5).abs() < 1e-4);
    }

    #[test]
    fn garbage_is_an_audio_error() {
        for bytes in [&b""[..], b"not a wav file at all", b"RIFF\0\0\0\0WAVE"] {
            let err = decode_wav(bytes).unwrap_err();
            assert!(matches!(err, TtsError::Audio(_)), "{err:?}");
            assert!(!err.is_retryable());
        }
    }
}
