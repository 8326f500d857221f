// The one preprocessing of oncolite (edge_runtime/preprocess.py), in the browser.
//
// decode (EXIF orientation applied, colour profile ignored, transparency onto black) -> RGB ->
// resize to the model input with the named resample -> (x - mean) / std in float32 ->
// quantize with the input tensor's scale and zero point (round half to even, saturate).
//
// The resize is a port of Pillow's own (libImaging/Resample.c and Geometry.c, Pillow 13:
// fixed-point coefficients with 22 fractional bits, two passes, the pass order Pillow picks),
// not the canvas's: a canvas only decodes, at 1:1, so the pixels match Pillow's bit for bit
// whenever the browser decodes the file to the same pixels (always for 8-bit PNG).
// No DOM access here except the decoder helpers at the end; the arithmetic is plain functions.
"use strict";

const PRECISION_BITS = 22; // 32 - 8 - 2, as Pillow
const HALF = 1 << (PRECISION_BITS - 1);

const FILTERS = {
  area: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) }, // Pillow BOX
  bilinear: {
    support: 1.0,
    f: (x) => {
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    },
  },
  bicubic: {
    support: 2.0,
    f: (x) => {
      const a = -0.5;
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
};

export const RESAMPLES = ["bilinear", "bicubic", "nearest", "area"];

// Pillow precompute_coeffs + normalize_coeffs_8bpc: integer weights and [min, count] bounds.
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const inv = 1.0 / filterscale;
  const weights = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let ww = 0.0;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    k.fill(0);
    for (let x = 0; x < xmax; x++) {
      const w = filter.f((x + xmin - center + 0.5) * inv);
      k[x] = w;
      ww += w;
    }
    if (ww !== 0.0) for (let x = 0; x < xmax; x++) k[x] /= ww;
    for (let x = 0; x < ksize; x++) {
      const v = k[x] * (1 << PRECISION_BITS);
      weights[xx * ksize + x] = k[x] < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, weights, bounds };
}

function clip8(ss) {
  const v = ss >> PRECISION_BITS; // ss always fits an int32, as in Pillow's C
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// One pass along x over `rows` rows starting at `offset`; 4 bytes per pixel in and out.
function horizontal(src, srcWidth, offset, rows, outWidth, c) {
  const out = new Uint8ClampedArray(outWidth * rows * 4);
  for (let yy = 0; yy < rows; yy++) {
    const line = (yy + offset) * srcWidth * 4;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1], k = xx * c.ksize;
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let x = 0; x < xmax; x++) {
        const p = line + (x + xmin) * 4, w = c.weights[k + x];
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = (yy * outWidth + xx) * 4;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
      out[o + 3] = 255;
    }
  }
  return out;
}

// One pass along y; `c.bounds` already relative to `src`'s first row.
function vertical(src, width, outHeight, c) {
  const out = new Uint8ClampedArray(width * outHeight * 4);
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1], k = yy * c.ksize;
    for (let xx = 0; xx < width; xx++) {
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let y = 0; y < ymax; y++) {
        const p = ((y + ymin) * width + xx) * 4, w = c.weights[k + y];
        s0 += src[p] * w;
        s1 += src[p + 1] * w;
        s2 += src[p + 2] * w;
      }
      const o = (yy * width + xx) * 4;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
      out[o + 3] = 255;
    }
  }
  return out;
}

// Pillow's NEAREST resize: an affine scale with accumulated double coordinates (ImagingScaleAffine).
function nearest(src, inW, inH, outW, outH) {
  const out = new Uint8ClampedArray(outW * outH * 4);
  const a0 = inW / outW, a4 = inH / outH;
  const xs = new Int32Array(outW);
  let xo = a0 * 0.5;
  for (let x = 0; x < outW; x++) {
    xs[x] = xo < 0.0 ? -1 : Math.trunc(xo);
    xo += a0;
  }
  let yo = a4 * 0.5;
  for (let y = 0; y < outH; y++) {
    const yi = yo < 0.0 ? -1 : Math.trunc(yo);
    for (let x = 0; x < outW; x++) {
      const o = (y * outW + x) * 4;
      if (yi >= 0 && yi < inH && xs[x] >= 0 && xs[x] < inW) {
        const p = (yi * inW + xs[x]) * 4;
        out[o] = src[p];
        out[o + 1] = src[p + 1];
        out[o + 2] = src[p + 2];
      }
      out[o + 3] = 255;
    }
    yo += a4;
  }
  return out;
}

/**
 * RGBA pixels (width x height, 4 bytes each, alpha ignored) -> RGBA at outW x outH, as
 * Pillow's Image.resize((outW, outH), resample) gives for an RGB image.
 */
export function resize(rgba, inW, inH, outW, outH, resample) {
  if (inW === outW && inH === outH) return Uint8ClampedArray.from(rgba);
  if (resample === "nearest") return nearest(rgba, inW, inH, outW, outH);
  const filter = FILTERS[resample];
  if (!filter) throw new Error("unknown resample " + resample);
  const needH = outW !== inW, needV = outH !== inH;
  // Pillow 13: "If height is being scaled down more than twice the amount the width is,
  // run the vertical pass first".
  const horizontalFirst = !(inH - outH > 0 && inH - outH > (inW - outW) * 2);
  if (horizontalFirst) {
    const cv = coefficients(inH, outH, filter);
    let img = rgba, width = inW;
    if (needH) {
      const first = cv.bounds[0];
      const last = cv.bounds[outH * 2 - 2] + cv.bounds[outH * 2 - 1];
      for (let i = 0; i < outH; i++) cv.bounds[i * 2] -= first;
      img = horizontal(rgba, inW, first, last - first, outW, coefficients(inW, outW, filter));
      width = outW;
    }
    return needV ? vertical(img, width, outH, cv) : img;
  }
  const tmp = vertical(rgba, inW, outH, coefficients(inH, outH, filter));
  return needH ? horizontal(tmp, inW, 0, outH, outW, coefficients(inW, outW, filter)) : tmp;
}

// numpy's np.round: half to even.
export function roundHalfEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

const QUANT_RANGE = { uint8: [0, 255], int8: [-128, 127], int32: [-2147483648, 2147483647] };
const ARRAYS = { float32: Float32Array, uint8: Uint8Array, int8: Int8Array, int32: Int32Array };

/**
 * Resized RGBA -> the model's input tensor data (H*W*3, NHWC), exactly as
 * EdgeModel.quantize_input(normalize(pixels)) in Python: float32 (x - mean) / std, then for an
 * integer tensor round(x / scale + zero_point) half to even, saturated.
 */
export function toInput(rgba, pixels, prep, input) {
  const mean = prep.mean.map(Math.fround), std = prep.std.map(Math.fround);
  const Array_ = ARRAYS[input.dtype];
  if (!Array_) throw new Error("unsupported input type " + input.dtype);
  const out = new Array_(pixels * 3);
  const quantized = input.dtype !== "float32";
  const [lo, hi] = QUANT_RANGE[input.dtype] || [0, 0];
  for (let i = 0; i < pixels; i++) {
    for (let c = 0; c < 3; c++) {
      const x = Math.fround(Math.fround(rgba[i * 4 + c] - mean[c]) / std[c]);
      if (!quantized) {
        out[i * 3 + c] = x;
      } else {
        const q = roundHalfEven(x / input.scale + input.zero_point);
        out[i * 3 + c] = q < lo ? lo : q > hi ? hi : q;
      }
    }
  }
  return out;
}

/** Output tensor data -> probabilities, as EdgeModel.run + to_probabilities in Python. */
export function toProbabilities(data, output) {
  const y = Array.from(data, (q) =>
    output.dtype === "float32" ? q : Math.fround((q - output.zero_point) * output.scale));
  // numpy's add.reduce: the first element, plus the pairwise sum of the rest (sequential below 8).
  let rest = 0.0;
  for (let i = 1; i < y.length; i++) rest += y[i];
  const total = y[0] + rest;
  if (Math.min(...y) >= 0 && Math.abs(total - 1.0) <= 0.1) return y.map((v) => Math.fround(v / total));
  const max = Math.max(...y);
  const e = y.map((v) => Math.exp(v - max));
  let sum = e[0];
  for (let i = 1; i < e.length; i++) sum += e[i];
  return e.map((v) => Math.fround(v / sum));
}

/** EdgeModel.decide: the threshold's positive class if p >= value, else the argmax (first on ties). */
export function decide(probs, labels, threshold) {
  const argmax = (skip) => {
    let best = -1;
    for (let i = 0; i < probs.length; i++) {
      if (i === skip) continue;
      if (best < 0 || probs[i] > probs[best]) best = i;
    }
    return best;
  };
  if (!threshold) return argmax(-1);
  const positive = labels.indexOf(threshold.positive);
  if (probs[positive] >= threshold.value) return positive;
  return argmax(positive);
}

/**
 * How far the probabilities are from changing the decision (edge_runtime/decision.py margins):
 * top-1 minus top-2 probability, or |p(positive) - value| under a threshold.
 */
export function margin(probs, labels, threshold) {
  if (threshold) return Math.abs(probs[labels.indexOf(threshold.positive)] - threshold.value);
  const sorted = [...probs].sort((a, b) => b - a);
  return sorted.length > 1 ? sorted[0] - sorted[1] : sorted[0];
}

/** FNV-1a (32 bit) of a typed array's bytes: lets a test compare input tensors with Python's. */
export function digest(typed) {
  const bytes = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) {
    h ^= bytes[i];
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, "0");
}

// --- decoding (browser only) ---------------------------------------------------------------

// iOS Safari refuses canvases above 16.7 MP; a 12 MP phone photo stays under it and is decoded
// at full size. Anything larger is downscaled by the browser's decoder first (high quality),
// so a 50 MP photo never needs 200 MB of pixels on the phone.
export const MAX_DECODE_PIXELS = 4096 * 4096;

function naturalSize(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    const url = URL.createObjectURL(blob);
    img.onload = () => {
      URL.revokeObjectURL(url);
      resolve({ width: img.naturalWidth, height: img.naturalHeight });
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error("not an image this browser can decode; choose a PNG or JPEG"));
    };
    img.src = url;
  });
}

/**
 * Decode an image file into RGBA pixels: EXIF orientation applied, colour profile ignored (as
 * Pillow does), transparency composited onto black. Returns {rgba, width, height, original,
 * downscaled}.
 */
export async function decode(blob, maxPixels = MAX_DECODE_PIXELS) {
  const original = await naturalSize(blob);
  if (original.width < 1 || original.height < 1) throw new Error("image has no pixels");
  const options = { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" };
  let downscaled = false;
  if (original.width * original.height > maxPixels) {
    const f = Math.sqrt(maxPixels / (original.width * original.height));
    options.resizeWidth = Math.max(1, Math.floor(original.width * f));
    options.resizeHeight = Math.max(1, Math.floor(original.height * f));
    options.resizeQuality = "high";
    downscaled = true;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, options);
  } catch (err) {
    throw new Error("not an image this browser can decode; choose a PNG or JPEG");
  }
  const { width, height } = bitmap;
  const canvas = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(width, height)
    : Object.assign(document.createElement("canvas"), { width, height });
  const ctx = canvas.getContext("2d", { willReadFrequently: true, alpha: false });
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  return { rgba, width, height, original, downscaled };
}
