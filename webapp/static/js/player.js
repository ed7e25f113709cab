// Plays the source and the stem together, sample-aligned: both AudioBufferSourceNodes start at the
// same AudioContext time and offset. Each track has its own gain (volume, mute).

export class SyncPlayer {
  constructor() {
    this.ctx = null;
    this.tracks = new Map(); // name -> {buffer, gain, volume, muted}
    this.sources = [];
    this.playing = false;
    this.offset = 0; // seconds into the clip when paused
    this.startedAt = 0; // ctx time that corresponds to `offset` while playing
    this.onEnded = () => {};
  }

  #context() {
    if (!this.ctx) this.ctx = new AudioContext();
    for (const track of this.tracks.values()) this.#connect(track);
    return this.ctx;
  }

  #connect(track) {
    if (track.gain || !this.ctx) return;
    track.gain = this.ctx.createGain();
    track.gain.connect(this.ctx.destination);
    this.#applyGain(track);
  }

  #applyGain(track) {
    if (!track.gain) return;
    const value = track.muted ? 0 : track.volume;
    track.gain.gain.setTargetAtTime(value, this.ctx.currentTime, 0.01);
  }

  get duration() {
    let longest = 0;
    for (const t of this.tracks.values()) if (t.buffer) longest = Math.max(longest, t.buffer.duration);
    return longest;
  }

  get activeSources() { return this.sources.length; }

  setTrack(name, buffer) {
    const track = this.tracks.get(name) || { buffer: null, gain: null, volume: 1, muted: false };
    track.buffer = buffer;
    this.tracks.set(name, track);
    this.#connect(track);
    if (this.playing) this.seek(this.currentTime()); // restart with the new buffer, same position
  }

  setVolume(name, volume) { const t = this.tracks.get(name); if (t) { t.volume = volume; this.#applyGain(t); } }
  setMuted(name, muted) { const t = this.tracks.get(name); if (t) { t.muted = muted; this.#applyGain(t); } }

  currentTime() {
    if (!this.playing) return this.offset;
    return Math.min(this.duration, this.offset + Math.max(0, this.ctx.currentTime - this.startedAt));
  }

  async play() {
    if (this.playing || !this.duration) return;
    const ctx = this.#context();
    await ctx.resume();
    if (this.offset >= this.duration - 0.01) this.offset = 0;
    const when = ctx.currentTime + 0.05;
    for (const track of this.tracks.values()) {
      if (!track.buffer) continue;
      const node = ctx.createBufferSource();
      node.buffer = track.buffer;
      node.connect(track.gain);
      node.start(when, this.offset);
      this.sources.push(node);
    }
    const first = this.sources[0];
    first.onended = () => {
      if (this.sources.includes(first)) { this.#stopSources(); this.playing = false; this.offset = 0; this.onEnded(); }
    };
    this.startedAt = when;
    this.playing = true;
  }

  #stopSources() {
    const old = this.sources;
    this.sources = [];
    for (const node of old) { try { node.stop(); } catch { /* never started */ } node.disconnect(); }
  }

  pause() {
    if (!this.playing) return;
    this.offset = this.currentTime();
    this.#stopSources();
    this.playing = false;
  }

  seek(seconds) {
    const wasPlaying = this.playing;
    if (wasPlaying) { this.#stopSources(); this.playing = false; }
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    if (wasPlaying) return this.play();
    return Promise.resolve();
  }

  removeTrack(name) {
    const track = this.tracks.get(name);
    if (!track) return;
    if (this.playing) this.pause();
    if (track.gain) track.gain.disconnect();
    this.tracks.delete(name);
  }
}

// Decode audio bytes for drawing and playing, without an AudioContext (none may start before a click).
export async function decodeAudio(arrayBuffer) {
  const offline = new OfflineAudioContext(2, 1, 48000);
  return offline.decodeAudioData(arrayBuffer.slice(0));
}
