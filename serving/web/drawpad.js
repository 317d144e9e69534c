// A drawing pad on a <canvas>: pointer events (mouse, touch and pen alike), strokes kept as
// point lists so that undo redraws exactly what is left. The bitmap is what gets sent: dark
// ink on white paper, as a person sees it, encoded as PNG.

// MNIST's digits sit in a 20x20 box of a 28x28 picture with strokes about 2.5 px wide, 1/8
// of the box. A digit drawn across most of the pad with a pen 1/14 of the pad's width keeps
// that proportion (20 px on the 280 px pad).
const PEN_WIDTH_FRACTION = 1 / 14;
const INK = "#111";
const PAPER = "#fff";

export class DrawPad extends EventTarget {
  /** canvas: an HTMLCanvasElement; its width/height attributes fix the bitmap's size (px). */
  constructor(canvas) {
    super();
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.strokes = []; // [[{x, y}, ...], ...] in bitmap pixels
    this.active = null; // {pointerId, stroke} while a pointer draws
    this.penWidth = Math.round(canvas.width * PEN_WIDTH_FRACTION);
    this.redraw();
    canvas.addEventListener("pointerdown", (e) => this.onDown(e));
    canvas.addEventListener("pointermove", (e) => this.onMove(e));
    canvas.addEventListener("pointerup", (e) => this.onUp(e));
    canvas.addEventListener("pointercancel", (e) => this.onUp(e));
    // A second finger or a long press must not scroll, zoom or open a menu mid-stroke.
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  get isEmpty() {
    return this.strokes.length === 0;
  }

  /** Bitmap coordinates of a pointer event (the canvas may be shown at another CSS size). */
  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * this.canvas.width,
      y: ((event.clientY - box.top) / box.height) * this.canvas.height,
    };
  }

  onDown(event) {
    // One stroke at a time; a mouse draws with its main button only.
    if (this.active || (event.pointerType === "mouse" && event.button !== 0)) {
      return;
    }
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    const stroke = [this.point(event)];
    this.strokes.push(stroke);
    this.active = { pointerId: event.pointerId, stroke };
    this.dispatchEvent(new CustomEvent("strokestart"));
    this.drawDot(stroke[0]);
    this.changed(false);
  }

  onMove(event) {
    if (!this.active || event.pointerId !== this.active.pointerId) {
      return;
    }
    event.preventDefault();
    // Coalesced events: every position the pointer passed since the last frame, so a fast
    // stroke stays a smooth line instead of a polygon.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const stroke = this.active.stroke;
      const from = stroke[stroke.length - 1];
      const to = this.point(e);
      stroke.push(to);
      this.drawSegment(from, to);
    }
    this.changed(false);
  }

  onUp(event) {
    if (!this.active || event.pointerId !== this.active.pointerId) {
      return;
    }
    this.active = null;
    this.changed(true);
  }

  drawDot(p) {
    const ctx = this.context;
    ctx.fillStyle = INK;
    ctx.beginPath();
    ctx.arc(p.x, p.y, this.penWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  drawSegment(from, to) {
    const ctx = this.context;
    ctx.strokeStyle = INK;
    ctx.lineWidth = this.penWidth;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  redraw() {
    const ctx = this.context;
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    for (const stroke of this.strokes) {
      this.drawDot(stroke[0]);
      for (let i = 1; i < stroke.length; i++) {
        this.drawSegment(stroke[i - 1], stroke[i]);
      }
    }
  }

  undo() {
    if (this.isEmpty) {
      return;
    }
    this.strokes.pop();
    this.active = null;
    this.redraw();
    this.changed(true);
  }

  clear() {
    this.reset();
    this.changed(true);
  }

  /** Empty the pad without a "change" event (the page is about to show something else). */
  reset() {
    this.strokes = [];
    this.active = null;
    this.redraw();
  }

  /** The bitmap as a PNG Blob (280x280 RGBA, opaque). */
  toBlob() {
    return new Promise((resolve, reject) => {
      this.canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the canvas could not be encoded"))),
        "image/png");
    });
  }

  /** `done`: a stroke ended (or undo/clear), as opposed to a stroke still being drawn. */
  changed(done) {
    this.dispatchEvent(new CustomEvent("change", { detail: { done } }));
  }
}
