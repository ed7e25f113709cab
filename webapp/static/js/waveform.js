// Waveforms on canvases sharing one time axis, with a playhead, click-to-seek and a drag selection.

// Min/max per column over all channels: what a waveform of `columns` pixels shows.
export function peaks(buffer, columns) {
  const out = new Float32Array(columns * 2);
  const n = buffer.length;
  const channels = [];
  for (let c = 0; c < buffer.numberOfChannels; c++) channels.push(buffer.getChannelData(c));
  for (let x = 0; x < columns; x++) {
    const a = Math.floor((x * n) / columns);
    const b = Math.max(a + 1, Math.floor(((x + 1) * n) / columns));
    let lo = 0, hi = 0;
    for (const data of channels) {
      for (let i = a; i < b && i < n; i++) {
        const v = data[i];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    out[2 * x] = lo;
    out[2 * x + 1] = hi;
  }
  return out;
}

export class WaveformView {
  constructor(canvas, { color, selectable = false }) {
    this.canvas = canvas;
    this.color = color;
    this.selectable = selectable;
    this.buffer = null;
    this.duration = 0;
    this.playhead = 0;
    this.selection = null; // [start, end] seconds
    this.cache = null;
    this.onSeek = () => {};
    this.onSelect = () => {};
    new ResizeObserver(() => { this.cache = null; this.draw(); }).observe(canvas);
    this.#listen();
  }

  setBuffer(buffer, duration) {
    this.buffer = buffer;
    this.duration = duration || (buffer ? buffer.duration : 0);
    this.cache = null;
    this.draw();
  }

  setPlayhead(seconds) { this.playhead = seconds; this.draw(); }
  setSelection(range) { this.selection = range; this.draw(); }

  #timeAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - rect.left, 0), rect.width);
    return rect.width ? (x / rect.width) * this.duration : 0;
  }

  #listen() {
    let down = null;
    this.canvas.addEventListener("pointerdown", (e) => {
      if (!this.duration) return;
      down = { x: e.clientX, t: this.#timeAt(e), dragging: false };
      this.canvas.setPointerCapture(e.pointerId);
    });
    this.canvas.addEventListener("pointermove", (e) => {
      if (!down || !this.selectable) return;
      if (Math.abs(e.clientX - down.x) > 4) down.dragging = true;
      if (down.dragging) {
        const t = this.#timeAt(e);
        this.setSelection([Math.min(down.t, t), Math.max(down.t, t)]);
      }
    });
    this.canvas.addEventListener("pointerup", (e) => {
      if (!down) return;
      if (down.dragging) this.onSelect(this.selection);
      else this.onSeek(this.#timeAt(e));
      down = null;
    });
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, width, height);
    const mid = height / 2;
    g.fillStyle = "rgba(255,255,255,0.06)";
    g.fillRect(0, Math.floor(mid), width, Math.max(1, ratio));
    if (this.duration && this.selection) {
      const [a, b] = this.selection.map((t) => (t / this.duration) * width);
      g.fillStyle = "rgba(251,191,36,0.16)";
      g.fillRect(a, 0, Math.max(b - a, ratio), height);
      g.fillStyle = "rgba(251,191,36,0.8)";
      g.fillRect(a, 0, ratio, height);
      g.fillRect(b - ratio, 0, ratio, height);
    }
    if (this.buffer) {
      if (!this.cache || this.cache.length !== width * 2) this.cache = peaks(this.buffer, width);
      const scale = (this.buffer.duration / this.duration) || 1; // a buffer shorter than the axis stops early
      g.fillStyle = this.color;
      for (let x = 0; x < width * Math.min(scale, 1); x++) {
        const lo = this.cache[2 * Math.floor(x / scale)], hi = this.cache[2 * Math.floor(x / scale) + 1];
        const top = mid - hi * mid * 0.95, bottom = mid - lo * mid * 0.95;
        g.fillRect(x, top, 1, Math.max(ratio, bottom - top));
      }
    }
    if (this.duration) {
      const x = (this.playhead / this.duration) * width;
      g.fillStyle = "#ffffff";
      g.fillRect(Math.min(x, width - ratio), 0, Math.max(1, ratio * 1.5), height);
    }
  }
}
