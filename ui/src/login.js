const form = document.getElementById("login");
const message = document.getElementById("message");

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  message.textContent = "";
  message.className = "";
  const body = { name: form.name.value, password: form.password.value };
  const r = await fetch("/api/v1/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (r.ok) {
    // Only a path of this UI: an attacker's link cannot send the reviewer elsewhere after sign-in.
    const next = new URLSearchParams(location.search).get("next") ?? "";
    location.assign(/^\/ui\/[a-z]+(\?[^\\]*)?$/.test(next) ? next : "/ui/sessions");
    return;
  }
  const e = await r.json().catch(() => ({ message: r.statusText }));
  message.className = "error";
  message.setAttribute("role", "alert");
  message.textContent = e.message;
});
