// Follow one license from an Electron main process (or any Node >= 20 program).
// The same file is quoted in docs/desktop.md and run by tests/test_node_client.py.
import { EventSource } from "eventsource";

/**
 * @param {object} options
 * @param {string} options.baseUrl      the broker, e.g. "https://licenses.example.com"
 * @param {string} options.licenseId
 * @param {() => Promise<string>} options.getToken   asks your web app for a fresh subscriber token
 * @param {(state: object) => void} options.onState  every event: the license's state after it
 * @param {(status: string) => void} [options.onStatus]  "live", "reconnecting", "unauthorized"
 * @returns {() => void} stop
 */
export function followLicense({ baseUrl, licenseId, getToken, onState, onStatus = () => {} }) {
  let source = null;
  let lastEventId = null;
  let timer = null;
  let stopped = false;
  let failures = 0;

  function open() {
    if (stopped) return;
    const url = new URL(`/api/licenses/${encodeURIComponent(licenseId)}/events`, baseUrl);
    // A new EventSource starts without a Last-Event-ID: name the resume point ourselves.
    if (lastEventId !== null) url.searchParams.set("lastEventId", lastEventId);
    source = new EventSource(url, {
      // The token goes in a header, never in the URL (so it stays out of proxy logs), and is
      // asked for on every connection, so an expired one is replaced by the next reconnect.
      fetch: async (input, init) =>
        fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${await getToken()}` } }),
    });
    source.onopen = () => {
      failures = 0;
      onStatus("live");
    };
    source.onmessage = (message) => {
      lastEventId = message.lastEventId;
      onState(JSON.parse(message.data));
    };
    source.onerror = (error) => {
      if (source.readyState !== EventSource.CLOSED) {
        onStatus("reconnecting"); // the library retries by itself, as the server's retry: says
        return;
      }
      // Closed for good: 401/403 (a token problem) or a response that is not an event stream.
      // Try again with a fresh token, backing off up to a minute, with jitter.
      source.close();
      onStatus(error.code === 401 || error.code === 403 ? "unauthorized" : "reconnecting");
      const delay = Math.min(60_000, 1000 * 2 ** failures++) * (0.5 + Math.random() / 2);
      timer = setTimeout(open, delay);
    };
  }

  open();
  return () => {
    stopped = true;
    clearTimeout(timer);
    source?.close();
  };
}
