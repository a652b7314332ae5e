// Keyboard shortcuts of the draft page, and confirmation before forms that change the champion.
"use strict";

function typingIn(target) {
  return target.matches("textarea, input, select, [contenteditable]");
}

function press(form, action) {
  form.querySelector(`button[name="action"][value="${action}"]`).click();
}

document.addEventListener("keydown", (event) => {
  const form = document.getElementById("correction");
  if (form && event.ctrlKey && event.key === "Enter") {
    event.preventDefault();
    press(form, "edit");
  } else if (form && event.altKey && event.code === "KeyA") {
    event.preventDefault();
    press(form, "accept");
  } else if (form && event.altKey && event.code === "KeyR") {
    event.preventDefault();
    press(form, "reject");
  } else if (!typingIn(event.target) && !event.ctrlKey && !event.altKey && !event.metaKey) {
    const link = { j: 'a[rel="next"]', k: 'a[rel="prev"]' }[event.key];
    if (link && document.querySelector(link)) {
      document.querySelector(link).click();
    } else if (event.key === "e" && form) {
      event.preventDefault();
      form.querySelector("textarea").focus();
    }
  }
});

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
