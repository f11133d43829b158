// Placeholder for Tether's browser client (protocol §6).
//
// The real module is built from the repository's js/ folder (js/dist/tether.js) and copied over
// this file (server/tether/server/static/tether.js) by the JS build, so that `tether serve`
// serves it at GET /tether.js and the Python wheel ships it. This checkout has not built it.

const NOT_BUILT =
  "Tether's browser client is not built: run the JS build (js/), which copies " +
  "js/dist/tether.js to server/tether/server/static/tether.js";

export class TetherError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "TetherError";
    this.code = code;
  }
}

export class TetherClient {
  constructor() {
    throw new TetherError("not_built", NOT_BUILT);
  }
}

export const built = false;
