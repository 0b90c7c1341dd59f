// The service's pages (jobs, search playground) share this one API client, served from the service
// itself (GET /static/api.js): one place for how a page calls the API, reads its OpenAI-shaped errors
// ({"error": {"message", "type", "code", "param"}}), shows them, and builds DOM from data. Vanilla JS,
// no build step, no CDN; a page's own script uses it as `Duet`.
"use strict";
window.Duet = (() => {
  // ---- DOM helper: every piece of data goes in as a text node, never as markup. ----

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ---- API calls ----

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // A caller of the API. `authHeaders` (optional) gives the headers that authenticate each call, read
  // at call time (the playground sends the key typed into it as `Authorization: Bearer ...`).
  // The caller returns the body of a successful answer; `onResponse` (optional) also sees the response,
  // for its headers. A failure is an ApiError with the server's own message (status 0: unreachable).
  function client(authHeaders = () => ({})) {
    return async function api(path, options = {}, onResponse = null) {
      let response;
      try {
        response = await fetch(path, {
          ...options,
          headers: { Accept: "application/json", ...authHeaders(), ...options.headers },
        });
      } catch (error) {
        throw new ApiError(`Cannot reach the service: ${error.message}`, 0, null);
      }
      const text = await response.text();
      let body = null;
      try {
        body = text ? JSON.parse(text) : null;
      } catch {
        body = null;
      }
      if (!response.ok) {
        const detail = body?.error;
        const message = typeof detail?.message === "string" ? detail.message : `${response.status} ${response.statusText}`;
        throw new ApiError(message, response.status, detail?.code ?? null);
      }
      if (onResponse) onResponse(response);
      return body;
    };
  }

  // The words a user sees for an error: the server's message and its status, or the error's own text.
  function errorMessage(error) {
    return error instanceof ApiError && error.status ? `${error.message} (HTTP ${error.status})` : String(error.message ?? error);
  }

  // ---- Error banner (#banner, #banner-text, #banner-close): one message at a time. ----

  // `show(error, source)` replaces the message; `clear(source)` hides it only if that source showed
  // it (so a refresh that succeeds does not hide another part's failure); `clear()` hides any.
  // `onShow(error)` (optional) runs after a message is shown.
  function banner(onShow = null) {
    const box = document.getElementById("banner");
    const text = document.getElementById("banner-text");
    let owner = null;

    function show(error, source = "action") {
      text.textContent = errorMessage(error);
      box.hidden = false;
      owner = source;
      if (onShow) onShow(error);
    }

    function clear(source) {
      if (source !== undefined && source !== owner) return;
      box.hidden = true;
      text.textContent = "";
      owner = null;
    }

    document.getElementById("banner-close").addEventListener("click", () => clear());
    return { show, clear };
  }

  return { el, ApiError, client, errorMessage, banner };
})();
